"""The release record of a sealed model (`release.json`): which release of the signer's model it is.

Written by `seal` into the artifact it signs (listed and hashed in the manifest, so the signature
covers it), read back only after the signature verified. A receiver that has seen release N
refuses anything older with `min_release=N` (`--min-release N`): an attacker who kept an older
sealed file from the same signer can no longer roll a receiver back to it.
"""

from __future__ import annotations

import datetime as _dt
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import SecquantError

RELEASE_NAME = "release.json"
MAX_RELEASE = 2**63 - 1
_MAX_BYTES = 4096


class RollbackError(SecquantError):
    """A sealed model is older than the release the receiver asked for, or carries no release number."""


class Release(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    format: Literal["secquant.release"] = "secquant.release"
    release: int = Field(ge=0, le=MAX_RELEASE)
    sealed_at: str

    def describe(self) -> str:
        return f"release {self.release} (sealed {self.sealed_at})"


def new_release(release: int | None = None) -> Release:
    """The record for a seal made now: `release`, or by default the UTC time in whole seconds, which
    grows from one seal to the next without the signer keeping a counter."""
    now = _dt.datetime.now(_dt.timezone.utc)
    number = int(now.timestamp()) if release is None else release
    if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= MAX_RELEASE:
        raise SecquantError(f"release {release!r}: give a whole number from 0 to {MAX_RELEASE}")
    return Release(release=number, sealed_at=now.isoformat(timespec="seconds").replace("+00:00", "Z"))


def write_release(artifact_dir: Path, rel: Release) -> Path:
    path = Path(artifact_dir) / RELEASE_NAME
    path.write_text(rel.model_dump_json() + "\n", encoding="utf-8")
    return path


def read_release(artifact_dir: str | Path) -> Release | None:
    """The release record of a verified artifact directory, or None if it carries none (sealed
    before releases were recorded). A malformed record is an error."""
    path = Path(artifact_dir) / RELEASE_NAME
    if not path.is_file():
        return None
    data = path.read_bytes()[: _MAX_BYTES + 1]
    try:
        if len(data) > _MAX_BYTES:
            raise ValueError(f"over {_MAX_BYTES} bytes")
        return Release.model_validate(json.loads(data))
    except (ValueError, ValidationError) as e:
        raise SecquantError(f"{path} is not a valid release record ({str(e).splitlines()[0]})") from None


def check_release(rel: Release | None, min_release: int | None, what: str) -> None:
    """Refuse a model older than `min_release` (None: accept any release, or none)."""
    if min_release is None:
        return
    if rel is None:
        raise RollbackError(f"{what} carries no release number (sealed before secquant recorded releases), so it "
                            f"cannot be shown to be release {min_release} or newer: refusing it (ask the signer to "
                            "seal it again, or drop --min-release)")
    if rel.release < min_release:
        raise RollbackError(f"{what} is {rel.describe()}, older than the minimum release {min_release}: refusing a "
                            "rollback to an older model (get the current sealed file from its signer)")
