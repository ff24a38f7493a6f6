"""Issue 13 item 8: rollback. The signer seals release numbers into the signed artifact; a receiver
that has seen release N refuses older sealed files from the same signer (`--min-release N`,
`min_release=N`) on every face that opens sealed files, and an attacker cannot change the number
without breaking the signature."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time
from pathlib import Path

import pyrage
import pytest
from typer.testing import CliRunner

import secquant
from secquant.cli import app
from secquant.errors import SecquantError
from secquant.security import RollbackError, keygen, open_sealed, read_release, seal
from secquant.security.release import RELEASE_NAME
from secquant.security.seal import SealError


@pytest.fixture(scope="module")
def alice(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("rollback-keys") / "alice")


@pytest.fixture(scope="module")
def releases(alice, digits_artifact, tmp_path_factory) -> dict[int, Path]:
    """Release 5 (old, kept by the attacker) and release 7 (current) of the same model and signer."""
    d = tmp_path_factory.mktemp("releases")
    art = digits_artifact("w8a16")
    return {n: seal(art, [str(alice.recipient)], alice.sign_key, d / f"r{n}.age", release=n) for n in (5, 7)}


def _identity(keys):
    return [pyrage.x25519.Identity.from_str(
        next(ln for ln in keys.identity.read_text().splitlines() if ln.startswith("AGE-")))]


def _members(sealed: Path, keys) -> dict[str, bytes]:
    with tarfile.open(fileobj=io.BytesIO(pyrage.decrypt(sealed.read_bytes(), _identity(keys)))) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar}


def _reseal_tar(members: dict[str, bytes], keys, out: Path) -> Path:
    """What an attacker holding a recipient's public key can do: re-tar and re-encrypt, not re-sign."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out.write_bytes(pyrage.encrypt(buf.getvalue(), [pyrage.x25519.Recipient.from_str(
        keys.recipient.read_text().strip())]))
    return out


def test_older_release_is_refused_newer_accepted(alice, releases, tmp_path):
    with pytest.raises(RollbackError, match="release 5 .*older than the minimum release 6"):
        open_sealed(releases[5], alice.identity, alice.verify_key, tmp_path / "old", min_release=6)
    assert not (tmp_path / "old").exists() and os.listdir(tmp_path) == []
    out = open_sealed(releases[7], alice.identity, alice.verify_key, tmp_path / "new", min_release=6)
    assert read_release(out).release == 7
    open_sealed(releases[7], alice.identity, alice.verify_key, tmp_path / "same", min_release=7)  # N itself passes
    open_sealed(releases[5], alice.identity, alice.verify_key, tmp_path / "any")  # no minimum: any release


def test_load_refuses_older_and_reports_the_release(alice, releases):
    shm = set(os.listdir("/dev/shm"))
    with pytest.raises(RollbackError, match="release 5"):
        secquant.load(releases[5], identity=alice.identity, verify_key=alice.verify_key, min_release=6)
    assert set(os.listdir("/dev/shm")) == shm
    qm = secquant.load(releases[7], identity=alice.identity, verify_key=alice.verify_key, min_release=6)
    assert qm.release.release == 7 and qm.release.sealed_at.endswith("Z")


@pytest.mark.parametrize("forged", [9, 6, 4])
def test_release_number_cannot_be_changed_without_the_signer(alice, releases, tmp_path, forged):
    """Re-tar release 5 claiming another number, with the manifest's hash updated to match: the
    signature no longer verifies, whatever --min-release says (and with none at all)."""
    import hashlib

    members = _members(releases[5], alice)
    rel = json.loads(members[f"artifact/{RELEASE_NAME}"])
    assert rel["release"] == 5
    rel["release"] = forged
    body = (json.dumps(rel) + "\n").encode()
    members[f"artifact/{RELEASE_NAME}"] = body
    manifest = json.loads(members["artifact/secquant.json"])
    manifest["files"][RELEASE_NAME] = hashlib.sha256(body).hexdigest()
    members["artifact/secquant.json"] = json.dumps(manifest).encode()
    src = _reseal_tar(members, alice, tmp_path / "forged.age")
    for minimum in (6, None):
        with pytest.raises(SealError, match="signature verification failed"):
            open_sealed(src, alice.identity, alice.verify_key, tmp_path / "o", min_release=minimum)
    assert sorted(os.listdir(tmp_path)) == ["forged.age"]


def test_release_record_cannot_be_swapped_between_releases(alice, releases, tmp_path):
    """Release 7's (genuinely signed) record put into release 5's tar: refused too."""
    old, new = _members(releases[5], alice), _members(releases[7], alice)
    for name in (f"artifact/{RELEASE_NAME}", "artifact/secquant.json"):
        old[name] = new[name]
    src = _reseal_tar(old, alice, tmp_path / "swapped.age")
    with pytest.raises(SealError, match="signature verification failed"):
        open_sealed(src, alice.identity, alice.verify_key, tmp_path / "o", min_release=6)


def test_stripping_the_release_record_breaks_the_signature(alice, releases, tmp_path):
    members = _members(releases[5], alice)
    del members[f"artifact/{RELEASE_NAME}"]
    manifest = json.loads(members["artifact/secquant.json"])
    del manifest["files"][RELEASE_NAME]
    members["artifact/secquant.json"] = json.dumps(manifest).encode()
    src = _reseal_tar(members, alice, tmp_path / "stripped.age")
    with pytest.raises(SealError, match="signature verification failed"):
        open_sealed(src, alice.identity, alice.verify_key, tmp_path / "o")


def test_a_file_sealed_before_releases_is_refused_under_a_minimum(alice, releases, tmp_path):
    """A genuinely signed model with no release record (what older secquant wrote) opens without
    a minimum, and is refused with one: it cannot show it is new enough."""
    from model_signing import signing

    art = open_sealed(releases[7], alice.identity, alice.verify_key, tmp_path / "a")
    (art / RELEASE_NAME).unlink()
    manifest = json.loads((art / "secquant.json").read_text())
    del manifest["files"][RELEASE_NAME]
    (art / "secquant.json").write_text(json.dumps(manifest))
    signing.Config().use_elliptic_key_signer(private_key=alice.sign_key).sign(art, tmp_path / "model.sig")
    members = {f"artifact/{p.name}": p.read_bytes() for p in art.iterdir()}
    members["model.sig"] = (tmp_path / "model.sig").read_bytes()
    src = _reseal_tar(members, alice, tmp_path / "legacy.age")
    out = open_sealed(src, alice.identity, alice.verify_key, tmp_path / "legacy-open")
    assert read_release(out) is None
    with pytest.raises(RollbackError, match="carries no release number"):
        open_sealed(src, alice.identity, alice.verify_key, tmp_path / "o", min_release=1)


def test_default_release_is_the_seal_time(alice, digits_artifact, tmp_path):
    t0 = int(time.time())
    sealed = seal(digits_artifact("w8a16"), [str(alice.recipient)], alice.sign_key, tmp_path / "d.age")
    rel = read_release(open_sealed(sealed, alice.identity, alice.verify_key, tmp_path / "o"))
    assert t0 <= rel.release <= int(time.time())


def test_resealing_an_opened_release_gets_the_new_number(alice, releases, tmp_path):
    """Seal from a directory opened from release 5: the old record is replaced, not kept."""
    art = open_sealed(releases[5], alice.identity, alice.verify_key, tmp_path / "a")
    again = seal(art, [str(alice.recipient)], alice.sign_key, tmp_path / "r8.age", release=8)
    opened = open_sealed(again, alice.identity, alice.verify_key, tmp_path / "b", min_release=8)
    assert read_release(opened).release == 8


def test_bad_minimums_and_directories(alice, releases, digits_artifact, tmp_path):
    for bad in (-1, 1.5, "7", True):
        with pytest.raises(SecquantError, match="min_release"):
            open_sealed(releases[7], alice.identity, alice.verify_key, tmp_path / "o", min_release=bad)
    with pytest.raises(SecquantError, match="release"):
        seal(digits_artifact("w8a16"), [str(alice.recipient)], alice.sign_key, tmp_path / "x.age", release=-3)
    with pytest.raises(SecquantError, match="sealed files only"):
        secquant.load(digits_artifact("w8a16"), allow_unsealed=True, min_release=1)
    assert os.listdir(tmp_path) == []


def _one_error(r, *contains: str) -> None:
    assert r.exit_code == 2, (r.exit_code, r.stderr, r.exception)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    for c in contains:
        assert c in lines[0], lines[0]


def test_every_command_that_opens_sealed_files_takes_min_release(alice, releases, tmp_path):
    runner = CliRunner()
    keys = ["--identity", str(alice.identity), "--verify-key", str(alice.verify_key)]
    old = str(releases[5])
    _one_error(runner.invoke(app, ["open", old, *keys, "--out", str(tmp_path / "o"), "--min-release", "6"]),
               "release 5")
    _one_error(runner.invoke(app, ["integrity", old, *keys, "--min-release", "6"]), "release 5")
    _one_error(runner.invoke(app, ["serve", old, *keys, "--db", str(tmp_path / "s.db"), "--min-release", "6"]),
               "release 5")
    wm = tmp_path / "owner.wm"
    assert runner.invoke(app, ["watermark", "keygen", "--out", str(wm)]).exit_code == 0
    _one_error(runner.invoke(app, ["watermark", "verify", old, "--key", str(wm), *keys, "--min-release", "6"]),
               "release 5")
    assert not (tmp_path / "o").exists()
    # and they say which release they opened
    r = runner.invoke(app, ["open", str(releases[7]), *keys, "--out", str(tmp_path / "o"), "--min-release", "6"])
    assert r.exit_code == 0 and "release 7 (sealed" in r.stderr, r.stderr
    r = runner.invoke(app, ["integrity", str(releases[7]), *keys, "--min-release", "7"])
    assert r.exit_code == 0 and json.loads(r.stdout)["release"] == 7 and "release 7" in r.stderr, r.stderr
    r = runner.invoke(app, ["seal", str(tmp_path / "o"), "--to", str(alice.recipient), "--sign-key",
                            str(alice.sign_key), "--out", str(tmp_path / "s.age"), "--release", "11"])
    assert r.exit_code == 0 and "release 11" in r.stderr
    shutil.rmtree(tmp_path / "o")
