"""Keys, sealing (model-signing + age) and opening: round trips and every refusal."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyrage
import pytest
import torch

import secquant
from secquant.errors import ArtifactError, OutputExistsError, SecquantError
from secquant.security import keygen, load_recipients, open_sealed, seal
from secquant.security.seal import SealError


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("seal")
    mp.setenv("SECQUANT_CACHE", str(d / "cache"))
    secquant.quantize("builtin:digits", "w8a16", out=d / "art")
    yield d / "art"
    mp.undo()


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return keygen(d / "alice"), keygen(d / "bob")


def _rec(k):
    return k.recipient.read_text().strip()


def test_keygen_files_and_modes(keys):
    alice, _ = keys
    assert oct(alice.identity.stat().st_mode & 0o777) == "0o600"
    assert oct(alice.sign_key.stat().st_mode & 0o777) == "0o600"
    assert _rec(alice).startswith("age1")
    assert "AGE-SECRET-KEY-1" in alice.identity.read_text()
    assert alice.sign_key.read_text().startswith("-----BEGIN PRIVATE KEY-----")
    with pytest.raises(SecquantError):
        keygen(alice.identity.with_suffix(""))  # never overwrites


def test_round_trip_and_load(art, keys, tmp_path):
    alice, bob = keys
    sealed = seal(art, [_rec(alice), str(bob.recipient)], alice.sign_key, tmp_path / "m.age")
    assert sealed.read_bytes().startswith(b"age-encryption.org/v1")
    for who in (alice, bob):  # both recipients can open it
        out = open_sealed(sealed, who.identity, alice.verify_key, tmp_path / f"open-{who.identity.stem}")
        x = torch.rand(4, 1, 8, 8)
        assert torch.equal(secquant.load(out, allow_unsealed=True)(x), secquant.load(art, allow_unsealed=True)(x))
    with pytest.raises(OutputExistsError):
        seal(art, [_rec(alice)], alice.sign_key, sealed)


def test_wrong_identity_and_unknown_signer(art, keys, tmp_path):
    alice, bob = keys
    sealed = seal(art, [_rec(alice)], alice.sign_key, tmp_path / "a.age")
    with pytest.raises(SealError, match="cannot be decrypted"):
        open_sealed(sealed, bob.identity, alice.verify_key, tmp_path / "o1")
    with pytest.raises(SealError, match="signature verification failed"):
        open_sealed(sealed, alice.identity, bob.verify_key, tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


@pytest.mark.parametrize("where", [0.02, 0.5, 0.98])
def test_tampered_bytes_are_refused(art, keys, tmp_path, where):
    alice, _ = keys
    sealed = seal(art, [_rec(alice)], alice.sign_key, tmp_path / "t.age")
    data = bytearray(sealed.read_bytes())
    data[int(len(data) * where)] ^= 0x01
    sealed.write_bytes(bytes(data))
    with pytest.raises(SealError):
        open_sealed(sealed, alice.identity, alice.verify_key, tmp_path / "o")
    assert not (tmp_path / "o").exists()


def tar_bytes(members: dict[str, bytes]) -> bytes:
    """A plain tar of regular files, as an attacker would build one."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _age_tar(tmp_path, members: dict[str, bytes], recipient) -> Path:
    p = tmp_path / "forged.age"
    p.write_bytes(pyrage.encrypt(tar_bytes(members), load_recipients([recipient])))
    return p


def test_unsigned_or_stripped_or_extended_bundles_are_refused(art, keys, tmp_path):
    alice, _ = keys
    files = {f"artifact/{p.name}": p.read_bytes() for p in art.iterdir()}
    unsigned = _age_tar(tmp_path, files, _rec(alice))
    with pytest.raises(SealError, match="no signature"):
        open_sealed(unsigned, alice.identity, alice.verify_key, tmp_path / "o1")
    # a genuine signature, but a file added next to the signed ones
    good = seal(art, [_rec(alice)], alice.sign_key, tmp_path / "g.age")
    plain = pyrage.decrypt(good.read_bytes(), [pyrage.x25519.Identity.from_str(
        [ln for ln in alice.identity.read_text().splitlines() if ln.startswith("AGE-")][0])])
    members = {}
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        for m in tar:
            members[m.name] = tar.extractfile(m).read()
    members["artifact/extra.txt"] = b"surprise"
    with pytest.raises(SealError, match="signature verification failed"):
        open_sealed(_age_tar(tmp_path, members, _rec(alice)), alice.identity, alice.verify_key, tmp_path / "o2")
    members.pop("artifact/extra.txt")
    members["../escape.txt"] = b"x"
    with pytest.raises(SealError, match="unexpected entries"):
        open_sealed(_age_tar(tmp_path, members, _rec(alice)), alice.identity, alice.verify_key, tmp_path / "o3")
    assert not (tmp_path.parent / "escape.txt").exists()


def test_a_tampered_artifact_is_never_sealed(art, keys, tmp_path):
    import shutil

    alice, _ = keys
    bad = tmp_path / "bad"
    shutil.copytree(art, bad)
    (bad / "extra.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError):
        seal(bad, [_rec(alice)], alice.sign_key, tmp_path / "b.age")
    assert not (tmp_path / "b.age").exists()


def test_passphrase_protected_keys(art, tmp_path):
    k = keygen(tmp_path / "carol", passphrase="correct horse")
    assert k.identity.read_bytes().startswith(b"age-encryption.org/v1")
    assert b"ENCRYPTED" in k.sign_key.read_bytes()
    with pytest.raises(SecquantError):
        seal(art, [_rec(k)], k.sign_key, tmp_path / "c.age")  # no passphrase for the signing key
    sealed = seal(art, [_rec(k)], k.sign_key, tmp_path / "c.age", sign_key_passphrase="correct horse")
    with pytest.raises(SecquantError, match="passphrase"):
        open_sealed(sealed, k.identity, k.verify_key, tmp_path / "o", identity_passphrase="wrong")
    open_sealed(sealed, k.identity, k.verify_key, tmp_path / "o", identity_passphrase="correct horse")
    assert (tmp_path / "o" / "model.safetensors").is_file()


def test_signature_verifies_with_the_model_signing_tool(art, keys, tmp_path):
    """The embedded signature is the standard OpenSSF format: its own CLI accepts it."""
    alice, _ = keys
    sealed = seal(art, [_rec(alice)], alice.sign_key, tmp_path / "m.age")
    ident = pyrage.x25519.Identity.from_str(
        [ln for ln in alice.identity.read_text().splitlines() if ln.startswith("AGE-")][0])
    with tarfile.open(fileobj=io.BytesIO(pyrage.decrypt(sealed.read_bytes(), [ident]))) as tar:
        tar.extractall(tmp_path / "x", filter="data")
    cli = Path(sys.executable).with_name("model_signing")
    r = subprocess.run([str(cli), "verify", "key", "--signature", str(tmp_path / "x" / "model.sig"),
                        "--public_key", str(alice.verify_key), str(tmp_path / "x" / "artifact")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    (tmp_path / "x" / "artifact" / "secquant.json").write_text("{}")
    r = subprocess.run([str(cli), "verify", "key", "--signature", str(tmp_path / "x" / "model.sig"),
                        "--public_key", str(alice.verify_key), str(tmp_path / "x" / "artifact")],
                       capture_output=True, text=True)
    assert r.returncode != 0


def test_cli_errors_exit_2(keys, tmp_path):
    from typer.testing import CliRunner

    from secquant.cli import app

    alice, _ = keys
    r = CliRunner().invoke(app, ["seal", str(tmp_path / "nope"), "--to", "age1bogus", "--sign-key",
                                 str(alice.sign_key), "--out", str(tmp_path / "s.age")])
    assert r.exit_code == 2 and "error:" in r.output
    r = CliRunner().invoke(app, ["open", str(tmp_path / "missing.age"), "--identity", str(alice.identity),
                                 "--verify-key", str(alice.verify_key), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "does not exist" in r.output
    assert os.listdir(tmp_path) == []


def test_load_sealed_in_memory(art, keys, tmp_path):
    alice, bob = keys
    sealed = seal(art, [_rec(alice)], alice.sign_key, tmp_path / "m.age")
    before = set(os.listdir("/dev/shm"))
    qm = secquant.load(sealed, identity=alice.identity, verify_key=alice.verify_key)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(qm(x), secquant.load(art, allow_unsealed=True)(x))
    assert set(os.listdir("/dev/shm")) == before  # plaintext removed
    assert os.listdir(tmp_path) == ["m.age"]  # nothing written next to the sealed file
    with pytest.raises(SecquantError, match="identity"):
        secquant.load(sealed)
    with pytest.raises(SealError):
        secquant.load(sealed, identity=bob.identity, verify_key=alice.verify_key)
    assert set(os.listdir("/dev/shm")) == before


def test_reseal_changes_the_recipient_list(art, keys, tmp_path):
    alice, bob = keys
    carol = keygen(tmp_path / "carol")
    sealed = seal(art, [_rec(alice), _rec(bob)], alice.sign_key, tmp_path / "ab.age")
    # remove bob, add carol; alice re-encrypts without the plaintext touching disk
    new = __import__("secquant.security", fromlist=["reseal"]).reseal(
        sealed, alice.identity, [_rec(alice), _rec(carol)], tmp_path / "ac.age")
    open_sealed(new, carol.identity, alice.verify_key, tmp_path / "o-carol")  # signature carried over
    with pytest.raises(SealError):
        open_sealed(new, bob.identity, alice.verify_key, tmp_path / "o-bob")
    with pytest.raises(SealError):
        __import__("secquant.security", fromlist=["reseal"]).reseal(
            new, bob.identity, [_rec(bob)], tmp_path / "b.age")
    assert not (tmp_path / "b.age").exists()
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["ab.age", "ac.age", "carol.key",
                                                                         "carol.pub", "carol.sign.key",
                                                                         "carol.sign.pub"]


def test_sealed_file_opens_with_the_reference_age_tool(art, keys, tmp_path):
    """Interoperability: Debian's `age` decrypts what secquant seals (.ci/run installs it)."""
    import shutil

    if shutil.which("age") is None:
        if os.environ.get("CI"):
            pytest.fail("the reference `age` tool must be installed in CI (.ci/run installs Debian's age)")
        pytest.skip("the reference `age` tool is not installed here (apt-get install age)")
    alice, _ = keys
    sealed = seal(art, [_rec(alice)], alice.sign_key, tmp_path / "m.age")
    r = subprocess.run(["age", "--decrypt", "-i", str(alice.identity), "-o", str(tmp_path / "m.tar"), str(sealed)],
                       capture_output=True)
    assert r.returncode == 0, r.stderr
    with tarfile.open(tmp_path / "m.tar") as tar:
        names = set(tar.getnames())
    assert "model.sig" in names and "artifact/model.safetensors" in names and "artifact/secquant.json" in names
    # and secquant opens what the reference tool encrypts (to our recipient)
    r = subprocess.run(["age", "--encrypt", "-r", _rec(alice), "-o", str(tmp_path / "again.age"),
                        str(tmp_path / "m.tar")], capture_output=True)
    assert r.returncode == 0, r.stderr
    out = open_sealed(tmp_path / "again.age", alice.identity, alice.verify_key, tmp_path / "o")
    assert (out / "model.safetensors").is_file()
