"""Issue 13 item 10 (key files): using an identity or signing key that other users can read
prints one clear warning line on stderr (and still works: the key is the user's to fix)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from secquant.cli import app
from secquant.security import keygen, load_identities, open_sealed, seal


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return keygen(tmp_path_factory.mktemp("perm-keys") / "erin")


@pytest.fixture(autouse=True)
def _private_again(keys):
    yield
    keys.identity.chmod(0o600)
    keys.sign_key.chmod(0o600)


def _warnings(err: str) -> list[str]:
    return [ln for ln in err.splitlines() if ln.startswith("warning:")]


@pytest.mark.parametrize("mode, who", [(0o644, "its group and all users"), (0o640, "its group"),
                                       (0o604, "all users"), (0o620, "its group")])
def test_exposed_identity_warns_once(keys, capsys, mode, who):
    keys.identity.chmod(mode)
    assert load_identities(keys.identity)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("warning:") and str(keys.identity) in lines[0] and f"{mode:04o}" in lines[0] \
        and who in lines[0] and f"chmod 600 {keys.identity}" in lines[0], lines[0]


def test_private_files_do_not_warn(keys, digits_artifact, tmp_path, capsys):
    sealed = seal(digits_artifact("w8a16"), [str(keys.recipient)], keys.sign_key, tmp_path / "m.age")
    open_sealed(sealed, keys.identity, keys.verify_key, tmp_path / "o")
    assert capsys.readouterr().err == ""


def test_exposed_signing_key_warns_when_sealing(keys, digits_artifact, tmp_path, capsys):
    keys.sign_key.chmod(0o644)
    seal(digits_artifact("w8a16"), [str(keys.recipient)], keys.sign_key, tmp_path / "m.age")
    lines = _warnings(capsys.readouterr().err)
    assert len(lines) == 1 and "signing key file" in lines[0] and str(keys.sign_key) in lines[0], lines


def test_cli_open_with_an_exposed_identity_warns_then_opens(keys, digits_artifact, tmp_path):
    sealed = seal(digits_artifact("w8a16"), [str(keys.recipient)], keys.sign_key, tmp_path / "m.age")
    keys.identity.chmod(0o644)
    r = CliRunner().invoke(app, ["open", str(sealed), "--identity", str(keys.identity), "--verify-key",
                                 str(keys.verify_key), "--out", str(tmp_path / "o")])
    assert r.exit_code == 0, r.stderr
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith("warning:") and "identity" in lines[0] and len(_warnings(r.stderr)) == 1, r.stderr
    assert lines[-1].startswith("opened and verified")
