"""The server secret that API keys are hashed under (HMAC-SHA-256), kept in a file outside the database.

Why a file and not a database row: a copy of the database alone (a backup, a dump, a replica)
must not be enough to check guessed keys or to forge a key record. Where it lives:

- `--secret-file PATH` (or `$SECQUANT_SERVER_SECRET_FILE`), for any database;
- by default, for a SQLite file `server.db`, the file `server.db.secret` next to it;
- a PostgreSQL database needs `--secret-file`: every server process on it must use the same file.

The file is created on first use (32 random bytes, hex, mode 0600, written to a temporary name and
linked into place so concurrent servers agree on one secret) and read on every start, so keys
survive restarts. A file that others can read or write is refused. Lost, it cannot be recreated:
the keys hashed under it stop working and must be rotated (`secquant server rotate-key`).
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from ..artifact.fsutil import atomic_file
from ..errors import OutputExistsError
from .db import ServerDBError

SECRET_BYTES = 32
ENV = "SECQUANT_SERVER_SECRET_FILE"


class ServerSecretError(ServerDBError):
    """The server secret file is missing where it must exist, unreadable, malformed or too open."""


def default_secret_path(database: str | None) -> Path | None:
    """`DB.secret` next to a SQLite database file; None for an in-memory database."""
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    return Path(database + ".secret")


def load_or_create_secret(path: str | os.PathLike) -> bytes:
    """The secret in `path`, creating the file (0600) if it does not exist."""
    path = Path(path).expanduser()
    if not path.exists() and not path.is_symlink():
        _create(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        raise ServerSecretError(f"cannot read the server secret {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ServerSecretError(f"the server secret {path} is not a regular file")
        if st.st_mode & 0o077:
            raise ServerSecretError(f"the server secret {path} is readable or writable by others (mode "
                                    f"{stat.S_IMODE(st.st_mode):04o}): make it its owner's only (chmod 600 {path})")
        raw = os.read(fd, 4 * SECRET_BYTES + 16)
    finally:
        os.close(fd)
    try:
        secret = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        secret = b""
    if len(secret) != SECRET_BYTES:
        raise ServerSecretError(f"the server secret {path} is not {SECRET_BYTES} bytes in hex: restore it from "
                                "your backup (the API keys are hashed under it)")
    return secret


def _create(path: Path) -> None:
    try:
        # exclusive: never replaces a secret another server just made (that one is then used)
        with atomic_file(path, mode=0o600, exclusive=True) as tmp, open(tmp, "wb") as f:
            f.write((secrets.token_bytes(SECRET_BYTES).hex() + "\n").encode())
            f.flush()
            os.fsync(f.fileno())
    except OutputExistsError:
        pass
    except OSError as e:
        raise ServerSecretError(f"cannot create the server secret {path}: {e.strerror}") from None
