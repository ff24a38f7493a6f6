"""The privacy ledger entry, typed: every spend of a DP budget (or the statement that none was spent) that an
artifact records is written through `ledger_entry`, so each one states the stage, the (epsilon, delta) spent,
and for a mechanism which one and the neighbour relation in words. Mechanisms add their own details
(accountant, noise scale, DP counts) as further fields. The manifest stores the validated JSON object."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class LedgerEntry(BaseModel):
    """One stage's privacy spend."""

    model_config = ConfigDict(extra="allow", frozen=True)

    stage: str
    epsilon: float = Field(ge=0.0)
    delta: float = Field(ge=0.0, lt=1.0)
    mechanism: str | None = None
    neighbouring: str | None = None
    statement: str | None = None


def ledger_entry(**fields: Any) -> dict[str, Any]:
    """A validated ledger entry as the JSON object a manifest stores (a missing or invalid field raises)."""
    return LedgerEntry(**fields).model_dump(exclude_none=True)
