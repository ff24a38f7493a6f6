"""Reading the tar stream inside a sealed file, which is hostile until its signature is checked.

Anyone holding a recipient's *public* key can seal a file to it, so everything here runs before
we know who made the file. Only what `seal` writes is accepted: regular-file members (each may
carry a pax extended header) named `model.sig` or `artifact/...`. Sparse members (GNU 'S', pax
`GNU.sparse.*`), links, devices, fifos, directories, GNU long names and global headers are refused
as soon as their 512-byte header is read, before tarfile reads a sparse map or a long header
into memory. The member count is capped, and every declared size is checked against what the
ciphertext can hold before a byte of it is written.
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from ..artifact.manifest import safe_relpath

SIG_NAME = "model.sig"
ART_DIR = "artifact"
MAX_MEMBERS = 1024  # an artifact holds a handful of files (weights, manifest, config, tokenizer, onnx)
MAX_PAX_BYTES = 64 * 1024  # our pax headers hold a path and an mtime: a few hundred bytes
MAX_NAME_CHARS = 1024
MAX_DEPTH = 16
_BUF = 1 << 20

# age (age-encryption.org/v1): a text header ending with the "--- MAC" line, then a 16-byte nonce
# and the payload in chunks of 64 KiB of plaintext, each followed by a 16-byte Poly1305 tag.
_AGE_MAGIC = b"age-encryption.org/"
_AGE_CHUNK, _AGE_TAG, _AGE_NONCE = 64 * 1024, 16, 16
_MAX_AGE_HEADER = 1 << 20

_TYPE_NAMES = {tarfile.SYMTYPE: "symbolic link", tarfile.LNKTYPE: "hard link", tarfile.CHRTYPE: "character device",
               tarfile.BLKTYPE: "block device", tarfile.FIFOTYPE: "fifo", tarfile.DIRTYPE: "directory",
               tarfile.GNUTYPE_SPARSE: "sparse file (GNU)", tarfile.CONTTYPE: "contiguous file",
               tarfile.GNUTYPE_LONGNAME: "GNU long name", tarfile.GNUTYPE_LONGLINK: "GNU long link",
               tarfile.XGLTYPE: "pax global header", tarfile.SOLARIS_XHDTYPE: "Solaris extended header"}
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)


class HostileTar(Exception):
    """The tar stream holds something `seal` never writes; the caller refuses the file."""


def max_plaintext_bytes(sealed: Path) -> int:
    """The most plaintext bytes the age file `sealed` can decrypt to.

    Exact for the binary format (header, nonce and one tag per 64 KiB chunk taken off the file
    size); for anything else (the ASCII-armored form, whose base64 is longer than its bytes) the
    file size, which still bounds it."""
    size = sealed.stat().st_size
    with open(sealed, "rb") as f:
        head = f.read(min(size, _MAX_AGE_HEADER))
    mac = head.find(b"\n--- ") if head.startswith(_AGE_MAGIC) else -1
    end = head.find(b"\n", mac + 1) if mac >= 0 else -1
    if end < 0:
        return size
    body = size - (end + 1) - _AGE_NONCE
    if body <= 0:
        return 0
    chunks = -(-body // (_AGE_CHUNK + _AGE_TAG))
    return max(0, body - _AGE_TAG * chunks)


class _StrictTarInfo(tarfile.TarInfo):
    """tarfile's header parser with a whitelist in front of it.

    `_proc_member` is the hook tarfile calls right after parsing a 512-byte header and before it
    acts on the type (reads a sparse map, a pax or GNU long-name block into memory); the
    `_proc_gnusparse_*` hooks are where pax sparse maps are applied. tarfile has had both since
    Python 3.2 and offers no public switch for either (its extraction filters act later, and
    still expand sparse members). An exception other than tarfile.HeaderError leaves tarfile's
    `next()` unchanged, so the refusal reaches the caller instead of ending the archive quietly.
    """

    def _proc_member(self, tarfile_):
        if self.type not in (*_FILE_TYPES, tarfile.XHDTYPE):
            kind = _TYPE_NAMES.get(self.type, f"member of type {self.type!r}")
            raise HostileTar(f"a {kind} ({self.name!r}), where only regular files belong")
        if self.type == tarfile.XHDTYPE and self.size > MAX_PAX_BYTES:
            raise HostileTar(f"a {self.size}-byte pax header (at most {MAX_PAX_BYTES})")
        return super()._proc_member(tarfile_)

    def _proc_gnusparse_00(self, *args):
        raise HostileTar("a sparse file (pax GNU.sparse header)")

    _proc_gnusparse_01 = _proc_gnusparse_10 = _proc_gnusparse_00


def _check_name(name: str) -> None:
    try:
        safe_relpath(name)
    except ValueError:
        raise HostileTar(f"an unsafe name {name!r}") from None
    p = PurePosixPath(name)
    if len(name) > MAX_NAME_CHARS or len(p.parts) > MAX_DEPTH:
        raise HostileTar(f"a name too long or too deep ({name[:80]!r}...)")
    if not (name == SIG_NAME or (len(p.parts) >= 2 and p.parts[0] == ART_DIR)):
        raise HostileTar(f"an unexpected entry {name!r} (only {SIG_NAME} and {ART_DIR}/... belong)")


def checked_members(tar: tarfile.TarFile, budget: int) -> Iterator[tarfile.TarInfo]:
    """The members of `tar`, each checked before it is yielded: a regular, non-sparse file with a
    safe name, no more than MAX_MEMBERS of them, whose declared sizes add up to at most `budget`."""
    total = 0
    for count, m in enumerate(tar, 1):
        if count > MAX_MEMBERS:
            raise HostileTar(f"more than {MAX_MEMBERS} entries")
        if m.type not in _FILE_TYPES or m.sparse is not None or any(k.startswith("GNU.sparse") for k in m.pax_headers):
            raise HostileTar(f"{m.name!r}, which is not a plain regular file")
        _check_name(m.name)
        total += m.size
        if m.size < 0 or total > budget:
            raise HostileTar(f"{m.name!r} declaring {m.size} bytes: more than the {budget} bytes of plaintext "
                             "the sealed file can hold")
        yield m


def _write_member(tar: tarfile.TarFile, m: tarfile.TarInfo, root: Path) -> str:
    """Write member `m` under `root` as a new private file, hashing while writing (the artifact
    check then needs no second read); a second entry with the same name is refused."""
    dst = root / m.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    src = tar.extractfile(m)
    try:
        out = open(dst, "xb")  # noqa: SIM115 - closed below
    except FileExistsError:
        raise HostileTar(f"a second entry named {m.name!r}") from None
    with out:
        while block := src.read(_BUF):
            h.update(block)
            out.write(block)
    return h.hexdigest()


def extract_sealed_tar(stream: BinaryIO, root: Path, budget: int) -> dict[str, str]:
    """Extract the tar read from `stream` under `root`; return each member's sha256 by name.

    Raises HostileTar at the first member that `seal` would not have written, before writing it;
    tarfile's own errors (tarfile.TarError, ValueError, ...) mean a malformed archive."""
    digests: dict[str, str] = {}
    with tarfile.open(fileobj=stream, mode="r|", bufsize=_BUF, tarinfo=_StrictTarInfo) as tar:
        for m in checked_members(tar, budget):
            digests[m.name] = _write_member(tar, m, root)
    return digests
