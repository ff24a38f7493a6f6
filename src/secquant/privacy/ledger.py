"""What an artifact records about the data it read: the calibration entry (which data, identified how) and
the privacy ledger (each spend of a DP budget, or the statement that none was spent). Typed here, in the
privacy layer; the artifact's manifest holds them. Torch-free."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class CalibrationEntry(BaseModel):
    """What data quantization read. A file's name is recorded only when the caller asks (it often says what
    the data is about); a file read without a privacy claim is identified by its sha256, a private file by
    an HMAC under a key that only the caller got (a public hash of private data is a membership test)."""

    model_config = ConfigDict(extra="forbid")

    data: Literal["none", "raw", "synthetic", "private"]
    source: str | None = None
    source_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    source_hmac_sha256: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")
    num_samples: int | None = Field(0, description="samples read; null for private data (its count is private: "
                                                   "the privacy ledger holds a differentially private estimate)")


class LedgerEntry(BaseModel):
    """One stage's privacy spend. Every entry states the stage and the (epsilon, delta) it spent (0, 0 for a
    run that read no private data) and, for a mechanism, which one and the neighbour relation in words;
    mechanisms add their own details (accountant, noise scale, DP counts) as further fields. Reads like the
    JSON object it is stored as (`entry["epsilon"]`)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    stage: str
    epsilon: float = Field(ge=0.0)
    delta: float = Field(ge=0.0, lt=1.0)
    mechanism: str | None = None
    neighbouring: str | None = None
    statement: str | None = None

    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def __contains__(self, key: str) -> bool:
        return key in self.model_dump()


class PrivacyLedger(BaseModel):
    """Privacy budget spent on the data this artifact saw (empty when no private data was read)."""

    model_config = ConfigDict(extra="forbid")

    entries: list[LedgerEntry] = Field(default_factory=list)
