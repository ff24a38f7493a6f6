"""Bad sealed input through the shell: every single-byte corruption, truncation, a borrowed
signature, a wrong or missing key, and a directory that is not an artifact are refused with
exit 2 and one `error:` line, and nothing decrypted is left on disk or in /dev/shm.

Complements test_seal.py (API-level refusals) without repeating it.
"""

from __future__ import annotations

import io
import os
import random
import shutil
import tarfile
from pathlib import Path

import pyrage
import pytest
from typer.testing import CliRunner

import secquant
from secquant.cli import app
from secquant.errors import SecquantError
from secquant.security import keygen, load_recipients, seal
from secquant.security.seal import SealError

from .test_seal import tar_bytes

N_CORRUPTIONS = 200
SEED = 20261128


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("corrupt-keys")
    return keygen(d / "alice"), keygen(d / "bob")


@pytest.fixture(scope="module")
def sealed(digits_artifact, keys, tmp_path_factory) -> Path:
    alice, _ = keys
    return seal(digits_artifact("w8a8"), [str(alice.recipient)], alice.sign_key,
                tmp_path_factory.mktemp("sealed") / "digits.age")


def _shm() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def _open(runner: CliRunner, src: Path, identity: Path, verify_key: Path, out: Path):
    return runner.invoke(app, ["open", str(src), "--identity", str(identity), "--verify-key", str(verify_key),
                               "--out", str(out)])


def _refused(r, out: Path, workdir_before: set[str], contains: tuple[str, ...] = ()) -> str:
    """Exit 2, exactly one `error:` line on stderr, no traceback, nothing decrypted left anywhere."""
    assert r.exit_code == 2, f"exit {r.exit_code}: {r.stderr!r} {r.exception!r}"
    assert r.exception is None or isinstance(r.exception, SystemExit), repr(r.exception)
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for c in contains:
        assert c.lower() in lines[0].lower(), lines[0]
    assert not out.exists(), f"{out} was written"
    assert set(os.listdir(out.parent)) == workdir_before, "temp files left next to the output"
    return lines[0]


def _work(tmp_path: Path, sealed_file: Path, data: bytes | None = None) -> Path:
    w = tmp_path / "w"
    w.mkdir(exist_ok=True)
    dst = w / "m.age"
    if data is None:
        shutil.copyfile(sealed_file, dst)
    else:
        dst.write_bytes(data)
    return dst


def test_random_single_byte_corruptions_are_all_refused(sealed, keys, tmp_path):
    alice, _ = keys
    good = sealed.read_bytes()
    runner = CliRunner()
    r = _open(runner, sealed, alice.identity, alice.verify_key, tmp_path / "ok")
    assert r.exit_code == 0, r.stderr  # the untouched file opens
    shutil.rmtree(tmp_path / "ok")
    rng = random.Random(SEED)
    shm = _shm()
    # the header (recipient stanza, MAC) is small: make sure some corruptions land in it
    header_end = good.index(b"\n---") + 48
    positions = [rng.randrange(header_end) for _ in range(N_CORRUPTIONS // 10)]
    positions += [rng.randrange(len(good)) for _ in range(N_CORRUPTIONS - len(positions))]
    for pos in positions:
        data = bytearray(good)
        data[pos] ^= rng.randrange(1, 256)
        src = _work(tmp_path, sealed, bytes(data))
        before = set(os.listdir(src.parent))
        _refused(_open(runner, src, alice.identity, alice.verify_key, src.parent / "out"), src.parent / "out",
                 before)
    assert _shm() == shm


@pytest.mark.parametrize("keep", [0, 20, "header", 0.5, -1])
def test_truncated_sealed_file(sealed, keys, tmp_path, keep):
    alice, _ = keys
    good = sealed.read_bytes()
    n = {"header": good.index(b"\n---") + 48}.get(keep, keep)
    n = int(len(good) * n) if isinstance(n, float) else (len(good) + n if n < 0 else n)
    src = _work(tmp_path, sealed, good[:n])
    before = set(os.listdir(src.parent))
    _refused(_open(CliRunner(), src, alice.identity, alice.verify_key, src.parent / "out"), src.parent / "out",
             before)


def _plain_members(sealed_file: Path, identity: Path) -> dict[str, bytes]:
    ident = pyrage.x25519.Identity.from_str(
        next(ln for ln in identity.read_text().splitlines() if ln.startswith("AGE-")))
    members = {}
    with tarfile.open(fileobj=io.BytesIO(pyrage.decrypt(sealed_file.read_bytes(), [ident]))) as tar:
        for m in tar:
            members[m.name] = tar.extractfile(m).read()
    return members


def test_signature_of_a_different_model_is_refused(sealed, digits_artifact, keys, tmp_path):
    alice, _ = keys
    other = seal(digits_artifact("w8a16"), [str(alice.recipient)], alice.sign_key, tmp_path / "other.age")
    members = _plain_members(sealed, alice.identity)
    members["model.sig"] = _plain_members(other, alice.identity)["model.sig"]  # same signer, other model
    src = _work(tmp_path, sealed, pyrage.encrypt(tar_bytes(members), load_recipients([str(alice.recipient)])))
    before, shm = set(os.listdir(src.parent)), _shm()
    _refused(_open(CliRunner(), src, alice.identity, alice.verify_key, src.parent / "out"), src.parent / "out",
             before, contains=("signature verification failed",))
    with pytest.raises(SealError, match="signature verification failed"):
        secquant.load(src, identity=alice.identity, verify_key=alice.verify_key)
    assert _shm() == shm


def test_unknown_recipient_and_missing_keys(sealed, keys, tmp_path):
    alice, bob = keys
    src = _work(tmp_path, sealed)
    before, shm = set(os.listdir(src.parent)), _shm()
    runner = CliRunner()
    out = src.parent / "out"
    _refused(_open(runner, src, bob.identity, alice.verify_key, out), out, before, contains=("cannot be decrypted",))
    _refused(_open(runner, src, tmp_path / "nobody.key", alice.verify_key, out), out, before,
             contains=("identity file", "does not exist"))
    _refused(_open(runner, src, alice.verify_key, alice.verify_key, out), out, before,
             contains=("no age identity",))  # a key file of the wrong kind
    _refused(_open(runner, src, alice.identity, tmp_path / "nobody.sign.pub", out), out, before,
             contains=("verify key", "does not exist"))
    with pytest.raises(SecquantError, match="does not exist"):
        secquant.load(src, identity=tmp_path / "nobody.key", verify_key=alice.verify_key)
    with pytest.raises(SealError, match="cannot be decrypted"):
        secquant.load(src, identity=bob.identity, verify_key=alice.verify_key)
    assert _shm() == shm


def test_corrupted_file_through_load_leaves_shm_clean(sealed, keys, tmp_path):
    alice, _ = keys
    data = bytearray(sealed.read_bytes())
    data[len(data) // 2] ^= 0x80
    src = _work(tmp_path, sealed, bytes(data))
    shm = _shm()
    with pytest.raises(SealError):
        secquant.load(src, identity=alice.identity, verify_key=alice.verify_key)
    assert _shm() == shm and os.listdir(src.parent) == ["m.age"]


@pytest.mark.parametrize("what", ["empty", "junk", "file"])
def test_seal_refuses_what_is_not_an_artifact(keys, tmp_path, what):
    alice, _ = keys
    w = tmp_path / "w"
    w.mkdir()
    d = w / "notart"
    if what == "file":
        d.write_bytes(b"not a directory")
    else:
        d.mkdir()
        if what == "junk":
            (d / "weights.bin").write_bytes(os.urandom(64))
            (d / "secquant.json").write_text("{not json")
    before = set(os.listdir(w))
    r = CliRunner().invoke(app, ["seal", str(d), "--to", str(alice.recipient), "--sign-key", str(alice.sign_key),
                                 "--out", str(w / "s.age")])
    _refused(r, w / "s.age", before)


@pytest.mark.parametrize("n", [1, 63, 64, 65, 5000])
@pytest.mark.parametrize("dtype", ["uint8", "int8", "int32"])
def test_record_from_the_file_equals_the_guards_checksums(n, dtype, tmp_path, monkeypatch):
    """Sealing computes the record from the weights file in chunks (bounded memory, no torch); the
    loader's guard from the tensors in memory: the same values, at every chunk and padding boundary."""
    import numpy as np
    from safetensors.numpy import save_file

    from secquant.security import checksums

    monkeypatch.setattr(checksums, "_CHUNK", 128)  # many chunks even for small layers
    rng = np.random.default_rng(n)
    info = np.iinfo(dtype)
    tensors = {"a.qweight": rng.integers(info.min, info.max, n, endpoint=True, dtype=dtype),
               "b.qweight": rng.integers(info.min, info.max, (n, 3), endpoint=True, dtype=dtype),
               "b.scale": np.ones(3, dtype=np.float32)}
    save_file(tensors, tmp_path / "w.safetensors")
    for gb in (64, 8):
        checksums.write_record_for_weights(tmp_path / "w.safetensors", tmp_path / "r", key=b"k" * 32, group_bytes=gb)
        key, got_gb, sums = checksums.read_record((tmp_path / "r").read_bytes())
        assert (key, got_gb, set(sums)) == (b"k" * 32, gb, set(tensors))  # v3: every tensor, not only codes
        for name, t in tensors.items():
            want = checksums.checksums_of(t, key, name, gb)
            assert want.shape == (-(-t.nbytes // gb),)
            assert np.array_equal(sums[name], want)


def test_every_single_bit_flip_of_a_word_changes_its_group_checksum():
    """The v2 scheme reads 32-bit words: a flip of any of the 32 bits of any word must show."""
    import numpy as np

    from secquant.security.checksums import checksums_of

    codes = np.random.default_rng(0).integers(0, 256, 256, dtype=np.uint8)
    ref = checksums_of(codes, b"s" * 32, "l", 64)
    for byte in range(codes.size):
        for bit in range(8):
            codes[byte] ^= 1 << bit
            diff = np.flatnonzero(checksums_of(codes, b"s" * 32, "l", 64) != ref).tolist()
            codes[byte] ^= 1 << bit
            assert diff == [byte // 64]
