"""Encrypted data at rest: calibration and audit files given as age-encrypted files (`data.jsonl.age`).

The file is decrypted (streaming, pyrage) into a private directory on the memory-backed /dev/shm,
read from there, and removed when the caller is done: the plaintext never reaches a disk.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from ..artifact.fsutil import atomic_file, private_dir
from ..errors import SecquantError

AGE_SUFFIX = ".age"


def is_encrypted(path: str | Path | None) -> bool:
    return path is not None and str(path).endswith(AGE_SUFFIX)


@contextlib.contextmanager
def plaintext_path(path: str | Path | None, identity: str | Path | None = None,
                   passphrase: str | None = None) -> Iterator[Path | str | None]:
    """`path` itself, or for an `.age` file a temporary in-memory plaintext copy (removed on exit)."""
    if not is_encrypted(path):
        yield path
        return
    import pyrage

    from ..security.keys import load_identities

    src = Path(path)
    if not src.is_file():
        raise SecquantError(f"{src} does not exist")
    if identity is None:
        raise SecquantError(f"{src} is age-encrypted: pass --identity KEY (identity=...) to decrypt it in memory")
    ids = load_identities(identity, passphrase)
    with private_dir("data", "decrypt it yourself to a protected location") as work:
        plain = work / src.name[: -len(AGE_SUFFIX)]
        try:
            with open(src, "rb") as f, open(plain, "wb") as out:
                pyrage.decrypt_io(f, out, ids)
        except Exception:
            raise SecquantError(f"{src} cannot be decrypted with {identity}: it is not encrypted to this identity, "
                                "or its bytes were modified") from None
        yield plain


def encrypt_file(path: str | Path, recipients: list[str], out: str | Path | None = None) -> Path:
    """Encrypt a data file to age recipients (written atomically as `<path>.age` by default)."""
    import pyrage

    from ..security.keys import load_recipients

    src = Path(path)
    if not src.is_file():
        raise SecquantError(f"{src} does not exist")
    dst = Path(out) if out else src.with_name(src.name + AGE_SUFFIX)
    with atomic_file(dst) as tmp, open(src, "rb") as f, open(tmp, "wb") as o:
        pyrage.encrypt_io(f, o, load_recipients(list(recipients)))
    return dst
