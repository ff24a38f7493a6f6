"""Issue 13 item 2: a file sealed to a recipient's *public* key is hostile until its signature is
checked. A tar whose headers declare far more than the file holds (GNU sparse, pax sparse, a lying
size), or holds anything but regular files, is refused before it is written out: the bytes the
process writes before the refusal are measured (/proc/self/io `wchar`, every thread's write
calls), and must stay under 64 MiB where the attack declares 1 GiB.

Every hostile file here is built exactly as an attacker would: tarfile plus pyrage.encrypt with
nothing but the recipient's public key.
"""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pyrage
import pytest
from typer.testing import CliRunner

import secquant
from secquant.cli import app
from secquant.security import keygen, open_sealed, seal
from secquant.security.seal import SealError
from secquant.security.sealed_tar import MAX_MEMBERS, max_plaintext_bytes

GiB = 1 << 30
WRITE_BAR = 64 << 20


@pytest.fixture(scope="module")
def alice(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("bomb-keys") / "alice")


def _recipient(keys) -> list:
    return [pyrage.x25519.Recipient.from_str(keys.recipient.read_text().strip())]


def _written() -> int:
    """Bytes this process (all its threads) has passed to write() so far."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


def _chksum(header: bytearray) -> bytes:
    header[148:156] = b" " * 8
    header[148:155] = b"%06o\0" % sum(header)
    return bytes(header)


def _octal(n: int, width: int = 12) -> bytes:
    return b"%0*o\0" % (width - 1, n)


def _pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


def gnu_sparse() -> bytes:
    """One GNU 'S' member: 512 stored bytes, a map saying the file is 1 GiB (the rest a hole)."""
    info = tarfile.TarInfo("artifact/model.safetensors")
    info.type, info.size = tarfile.GNUTYPE_SPARSE, 512
    h = bytearray(info.tobuf(tarfile.GNU_FORMAT))
    h[386:410] = _octal(0) + _octal(512)  # sparse[0] = (offset 0, 512 bytes); isextended (482) stays 0
    h[483:495] = _octal(GiB)  # realsize
    return _chksum(h) + b"x" * 512 + b"\0" * 1024


def _pax_member(pax: dict[str, str], name: str, data: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info = tarfile.TarInfo(name)
        info.size, info.pax_headers = len(data), pax
        tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def pax_sparse_10() -> bytes:
    """pax GNU sparse format 1.0: the map is the first block of the data; 1 GiB declared."""
    pax = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": "artifact/model.safetensors",
           "GNU.sparse.realsize": str(GiB)}
    return _pax_member(pax, "artifact/GNUSparseFile.0/model.safetensors", _pad(b"1\n0\n512\n") + b"x" * 512)


def pax_sparse_01() -> bytes:
    """pax GNU sparse format 0.1: the map in a pax keyword; 1 GiB declared."""
    return _pax_member({"GNU.sparse.map": "0,512", "GNU.sparse.size": str(GiB)}, "artifact/model.safetensors",
                       b"x" * 512)


def lying_size() -> bytes:
    """A regular member whose ustar header declares 1 GiB; the archive holds 2 KiB."""
    info = tarfile.TarInfo("artifact/model.safetensors")
    info.size = GiB
    return info.tobuf(tarfile.USTAR_FORMAT) + b"x" * 2048


def lying_pax_size() -> bytes:
    """The same lie told by a pax `size` keyword (how sizes over 8 GiB are written): 1 TiB."""
    return _pax_member({"size": str(1 << 40)}, "artifact/model.safetensors", b"x" * 512)


BOMBS = {"gnu-sparse": (gnu_sparse, "sparse"), "pax-sparse-1.0": (pax_sparse_10, "sparse"),
         "pax-sparse-0.1": (pax_sparse_01, "sparse"), "lying-ustar-size": (lying_size, "plaintext the sealed file"),
         "lying-pax-size": (lying_pax_size, "plaintext the sealed file")}


def _sealed_tar(tmp_path: Path, keys, tar_bytes: bytes, name: str = "bomb.age") -> Path:
    p = tmp_path / name
    p.write_bytes(pyrage.encrypt(tar_bytes, _recipient(keys)))
    return p


@pytest.mark.parametrize("bomb", list(BOMBS))
def test_declared_gigabytes_are_refused_before_writing(alice, tmp_path, bomb):
    build, reason = BOMBS[bomb]
    src = _sealed_tar(tmp_path, alice, build())
    assert src.stat().st_size < 16 << 10  # a few KB declaring 1 GiB or more
    before = _written()
    with pytest.raises(SealError, match=f"unexpected entries.*{reason}"):
        open_sealed(src, alice.identity, alice.verify_key, tmp_path / "out")
    wrote = _written() - before
    assert wrote < WRITE_BAR, f"{bomb}: {wrote} bytes written before the refusal"
    assert sorted(os.listdir(tmp_path)) == ["bomb.age"]  # no output, no staging left


@pytest.mark.parametrize("bomb", ["gnu-sparse", "pax-sparse-1.0"])
def test_load_writes_no_bomb_into_shared_memory(alice, tmp_path, bomb):
    """secquant.load opens into /dev/shm (RAM): the same refusal, before it fills memory."""
    src = _sealed_tar(tmp_path, alice, BOMBS[bomb][0]())
    shm = set(os.listdir("/dev/shm"))
    before = _written()
    with pytest.raises(SealError, match="sparse"):
        secquant.load(src, identity=alice.identity, verify_key=alice.verify_key)
    assert _written() - before < WRITE_BAR
    assert set(os.listdir("/dev/shm")) == shm


def test_cli_refuses_a_bomb_with_one_error_line(alice, tmp_path):
    src = _sealed_tar(tmp_path, alice, gnu_sparse())
    before = _written()
    r = CliRunner().invoke(app, ["open", str(src), "--identity", str(alice.identity), "--verify-key",
                                 str(alice.verify_key), "--out", str(tmp_path / "out")])
    assert _written() - before < WRITE_BAR
    assert r.exit_code == 2 and r.stderr.startswith("error:") and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert "sparse" in r.stderr and not (tmp_path / "out").exists()


def test_the_write_measure_sees_a_real_open(alice, digits_artifact, tmp_path):
    """The probe is not blind: opening a genuine sealed model counts at least its weights."""
    art = digits_artifact("w8a16")
    sealed = seal(art, [str(alice.recipient)], alice.sign_key, tmp_path / "ok.age")
    before = _written()
    out = open_sealed(sealed, alice.identity, alice.verify_key, tmp_path / "out")
    assert _written() - before >= (out / "model.safetensors").stat().st_size > 10_000


def _member(info: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info.size = len(data) if info.isreg() else 0
        tar.addfile(info, io.BytesIO(data) if info.isreg() else None)
    return buf.getvalue()


def _typed(name: str, kind: bytes, **kw) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in kw.items():
        setattr(info, k, v)
    return info


NOT_FILES = {
    "symlink": (lambda: _typed("artifact/model.safetensors", tarfile.SYMTYPE, linkname="/etc/passwd"),
                "symbolic link"),
    "hardlink": (lambda: _typed("artifact/model.safetensors", tarfile.LNKTYPE, linkname="artifact/secquant.json"),
                 "hard link"),
    "chardev": (lambda: _typed("artifact/zero", tarfile.CHRTYPE, devmajor=1, devminor=5), "character device"),
    "blockdev": (lambda: _typed("artifact/disk", tarfile.BLKTYPE, devmajor=8, devminor=0), "block device"),
    "fifo": (lambda: _typed("artifact/pipe", tarfile.FIFOTYPE), "fifo"),
    "directory": (lambda: _typed("artifact/sub", tarfile.DIRTYPE), "directory"),
    "contiguous": (lambda: _typed("artifact/model.safetensors", tarfile.CONTTYPE), "contiguous"),
    "gnu-long-name": (lambda: tarfile.TarInfo("artifact/" + "n" * 200), "GNU long name"),
}


@pytest.mark.parametrize("kind", list(NOT_FILES))
def test_only_regular_files_are_accepted(alice, tmp_path, kind):
    make, what = NOT_FILES[kind]
    src = _sealed_tar(tmp_path, alice, _member(make(), b"data"))
    with pytest.raises(SealError, match=f"unexpected entries.*{what}"):
        open_sealed(src, alice.identity, alice.verify_key, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["bomb.age"]


def test_an_oversized_pax_header_is_not_read_into_memory(alice, tmp_path):
    src = _sealed_tar(tmp_path, alice, _pax_member({"comment": "c" * (1 << 20)}, "artifact/x", b"z"))
    with pytest.raises(SealError, match="unexpected entries.*pax header"):
        open_sealed(src, alice.identity, alice.verify_key, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["bomb.age"]


def test_member_count_is_capped(alice, tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(MAX_MEMBERS + 50):
            tar.addfile(tarfile.TarInfo(f"artifact/f{i}"), io.BytesIO(b""))
    src = _sealed_tar(tmp_path, alice, buf.getvalue())
    with pytest.raises(SealError, match=f"more than {MAX_MEMBERS} entries"):
        open_sealed(src, alice.identity, alice.verify_key, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["bomb.age"]


@pytest.mark.parametrize("name", ["artifact/" + "d/" * 40 + "x", "artifact/" + "y" * 2000, "artifact/../x",
                                  "/artifact/x", "artifact//x", "elsewhere/x", "artifact/a\\b"])
def test_unsafe_or_unexpected_names(alice, tmp_path, name):
    info = tarfile.TarInfo(name)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        info.size = 1
        tar.addfile(info, io.BytesIO(b"z"))
    src = _sealed_tar(tmp_path, alice, buf.getvalue())
    with pytest.raises(SealError, match="unexpected entries"):
        open_sealed(src, alice.identity, alice.verify_key, tmp_path / "out")
    assert sorted(os.listdir(tmp_path)) == ["bomb.age"]


@pytest.mark.parametrize("size", [0, 1, 1000, 65536, 65537, 3 * 65536 + 5, 300_000])
def test_plaintext_bound_is_exact_for_age_files(alice, tmp_path, size):
    """The cap comes from the ciphertext: for files pyrage (not this code) encrypted, the bound
    equals the plaintext length, so it never refuses a genuine file and never allows more."""
    p = tmp_path / "x.age"
    p.write_bytes(pyrage.encrypt(os.urandom(size), _recipient(alice)))
    assert max_plaintext_bytes(p) == size
