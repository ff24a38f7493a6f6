"""Writing outputs whole or not at all, and private memory-backed working directories: one helper each,
used by every part of secquant that writes a file (torch-free).

- `refuse_existing`: an output that exists is refused before any work (unless overwriting was asked for);
- `atomic_dir` / `atomic_file`: write under a temporary sibling name, rename into place on success,
  delete on failure (`exclusive=True`: never replace a file that appeared meanwhile, e.g. a key);
- `private_dir`: a 0700 directory on the memory-backed /dev/shm for plaintext that must not reach a disk.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..errors import OutputExistsError, SecquantError

SHM = Path("/dev/shm")


def refuse_existing(out: str | os.PathLike, overwrite: bool = False, option: str = "--out") -> None:
    """Fail early, before any work, when `out` exists and overwriting was not asked for."""
    if Path(out).exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists: choose another {option} or remove it first")


@contextmanager
def atomic_dir(out: Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success rename it to `out`, on failure delete it."""
    out = Path(out)
    refuse_existing(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike, *, mode: int | None = None, exclusive: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling path to write; on success it becomes `path` (created with `mode` when given,
    e.g. 0o600 for secrets, set before any byte is written), on failure it is removed. `exclusive=True`
    refuses to replace a `path` that exists by then (the link fails), so a key is never overwritten."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    tmp = Path(name)
    try:
        os.fchmod(fd, mode if mode is not None else 0o666 & ~UMASK)
        os.close(fd)
        yield tmp
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise OutputExistsError(f"{path} already exists: it was not replaced") from None
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _read_umask() -> int:
    mask = os.umask(0o022)  # read once, at import (os.umask can only be read by setting it)
    os.umask(mask)
    return mask


UMASK = _read_umask()


@contextmanager
def private_dir(prefix: str, fallback: str) -> Iterator[Path]:
    """A fresh 0700 directory on the memory-backed /dev/shm, removed afterwards, for plaintext that must not
    reach a disk. Without a writable /dev/shm this refuses, saying what to do instead (`fallback`)."""
    if not SHM.is_dir() or not os.access(SHM, os.W_OK):
        raise SecquantError(f"no memory-backed /dev/shm to keep the plaintext off disk: {fallback}")
    work = Path(tempfile.mkdtemp(prefix=f"secquant-{prefix}-", dir=SHM))  # mode 0700
    try:
        yield work
    finally:
        shutil.rmtree(work, ignore_errors=True)
