"""The DP audit end to end: the replay check both ways (secure noise passes; the same mechanism with its noise
seeded, i.e. with the defence removed, fails), the canary audit on real DP artifacts, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import secquant
from secquant.errors import SecquantError
from secquant.models.digits import splits
from secquant.audits.dp_audit import EntryPoints, audit_artifact, claimed, is_private, mechanism, public_prior_once
from secquant.audits.replay import compare, released_tensors, replay_check
from secquant.recipes import get_preset

ENTRY = EntryPoints(secquant.quantize, secquant.qat)
N_TRAIN = 300


def _small(preset: str, n: int = 64):
    r = get_preset(preset)
    return r.model_copy(update={"calibration": r.calibration.model_copy(update={"num_samples": n})})


@pytest.fixture
def seeded_noise(monkeypatch):
    """The defences removed: DP-SGD noise and sampling from a fixed seed and the exact count (as before the
    fix), and DP calibration's OpenDP noise replaced by torch noise from a fixed seed."""
    import secquant.privacy.dp_calibration as dpc
    import secquant.privacy.dp_training as dpt

    monkeypatch.setattr(dpt, "secure_generator", lambda: torch.Generator().manual_seed(0))
    monkeypatch.setattr(dpt, "dp_count", lambda n, eps: (n, eps))
    monkeypatch.setattr(dpc, "_noisy_sums", lambda sums, sigma: sums.double() + sigma * torch.randn(
        sums.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64))


@pytest.fixture(scope="module")
def private_train(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("audit-data") / "train.safetensors"
    s = splits()
    save_file({"inputs": s["train_x"][:N_TRAIN].contiguous(), "labels": s["train_y"][:N_TRAIN].contiguous()}, str(p))
    return p


@pytest.fixture(scope="module")
def prior_once():
    """One data-free prior for every DP calibration of this module (the audit does the same)."""
    with public_prior_once():
        yield


def _dp_sgd(digits, train: Path, out: Path | None = None):
    return secquant.qat(digits, "w8a16", epochs=1, batch_size=100, lr=1e-3, train=train, dp_epsilon=4.0, out=out)


# ------------------------------------------------------------------------------------------- the check itself

def _tiny_dp_sgd() -> nn.Module:
    from secquant.privacy.dp_training import train_dp

    torch.manual_seed(3)
    lin = nn.Sequential(nn.Linear(4, 2))
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(120, 4, generator=g), torch.randint(0, 2, (120,), generator=g)
    train_dp(lin, x, y, epochs=1, lr=1e-2, batch_size=12, epsilon=4.0, delta=1e-3, accountant="rdp")
    return lin


def test_replay_check_passes_secure_dp_sgd():
    res = replay_check(_tiny_dp_sgd)
    assert res["result"] == "pass" and not res["replays_identical"] and res["identical_to_artifact"] is None
    assert res["between_replays"]["differing_tensors"] > 0 and res["between_replays"]["max_abs_diff"] > 0


def test_replay_check_fails_seeded_dp_sgd(seeded_noise):
    released = _tiny_dp_sgd()
    res = replay_check(_tiny_dp_sgd, released)
    assert res["result"] == "fail" and res["replays_identical"] and res["identical_to_artifact"]
    assert "not secret" in res["meaning"]


def test_compare_reports_what_differs():
    a = {"w": torch.zeros(3), "b": torch.ones(2, dtype=torch.int8)}
    assert compare(a, {k: v.clone() for k, v in a.items()})["identical"]
    c = compare(a, {"w": torch.tensor([0.0, 0.5, 0.0]), "b": a["b"]})
    assert not c["identical"] and c["differing_tensors"] == 1 and c["max_abs_diff"] == 0.5
    assert compare(a, {"w": a["w"], "b": a["b"].to(torch.int32)})["differing_tensors"] == 1  # dtype counts
    assert not compare(a, {"w": a["w"]})["identical"]
    assert set(released_tensors(nn.Linear(2, 2))) == {"weight", "bias"}
    with pytest.raises(ValueError):
        replay_check(_tiny_dp_sgd, runs=1)


# ------------------------------------------------------------------------------------------- real artifacts

def test_dp_calibration_artifact_passes_replay_and_canaries(digits, private_train, prior_once, tmp_path):
    qm = secquant.quantize(digits, _small("w8a8"), calib=private_train, dp_epsilon=1.0, out=tmp_path / "c")
    assert mechanism(qm.manifest) == "dp-calibration"
    res = audit_artifact(digits, qm, str(tmp_path / "c"), ENTRY, data=private_train, canaries=4)
    assert res["replay"] == "pass" and res["claimed_epsilon"] == 1.0
    assert res["canary"]["runs"] == res["canary"]["m"] == 4 and res["canary"]["neighbours"] == "add or remove one sample"
    assert res["canary_epsilon_lower_bound"] <= 1.0 and res["verdict"] == "pass"


def test_public_prior_once_changes_no_output(digits):
    a = secquant.quantize(digits, _small("w8a8", 32), calib="synthetic").module
    with public_prior_once():
        b = secquant.quantize(digits, _small("w8a8", 32), calib="synthetic").module
        c = secquant.quantize(digits, _small("w8a8", 32), calib="synthetic").module  # from the cache
    assert compare(released_tensors(a), released_tensors(b))["identical"]
    assert compare(released_tensors(a), released_tensors(c))["identical"]


def test_refusals(digits, digits_artifact, tmp_path):
    qm = secquant.load(digits_artifact("w8a8-dynamic"), allow_unsealed=True)
    with pytest.raises(SecquantError, match="read no private data"):
        audit_artifact(digits, qm, None, ENTRY)
    bad = tmp_path / "other.safetensors"
    save_file({"inputs": splits()["test_x"][:40].contiguous()}, str(bad))
    raw = secquant.quantize(digits, _small("w8a8", 32), calib=bad)  # records the file's sha256
    with pytest.raises(SecquantError, match="sha256"):  # not the data the artifact records
        audit_artifact(digits, raw, None, ENTRY, data=_other_file(tmp_path))
    fake = qm.manifest.model_copy(update={"privacy": qm.manifest.privacy.model_copy(
        update={"entries": [{"stage": "something new", "epsilon": 1.0, "delta": 1e-6}]})})
    with pytest.raises(SecquantError, match="cannot repeat|can repeat"):
        mechanism(fake)


def _other_file(tmp_path: Path) -> Path:
    p = tmp_path / "not-it.safetensors"
    save_file({"inputs": splits()["test_x"][40:80].contiguous()}, str(p))
    return p


# ------------------------------------------------------------------------------------------- CLI

def test_cli_audits_a_dp_sgd_artifact(cli, digits, private_train, tmp_path):
    """`secquant audit privacy` on a real DP-SGD artifact: the claim, replay pass, a canary bound below it."""
    _dp_sgd(digits, private_train, tmp_path / "dp")
    qm = secquant.load(tmp_path / "dp", allow_unsealed=True)
    assert mechanism(qm.manifest) == "dp-sgd" and is_private(qm.manifest)
    eps, delta = claimed(qm.manifest)
    r = cli("audit", "privacy", "--float", "builtin:digits", "--quantized", tmp_path / "dp", "--data", private_train,
            "--canaries", "40", "--shadows", "2", "--epochs", "1", "--json", "--out", tmp_path / "rep")
    assert r.exit_code == 0, r.stderr
    got = json.loads(r.stdout)
    assert list(got["models"]) == ["fp32"]  # a DP artifact is not compared with shadows like with like
    a = got["dp_audit"]["w8a16+dp-sgd"]
    assert (a["claimed_epsilon"], a["claimed_delta"]) == (eps, delta) and 3.5 < eps <= 4 and delta == 1e-5
    assert a["replay"] == "pass" and a["replay_detail"]["identical_to_artifact"] is False
    assert not a["replay_detail"]["replays_identical"] and a["neighbouring"].startswith("add or remove")
    c = a["canary"]
    assert c["m"] == 40 and c["runs"] == 1 and 0 <= c["correct_guesses"] <= c["guesses"] == c["k_plus"] + c["k_minus"]
    assert a["canary_epsilon_lower_bound"] == c["epsilon_lower_bound"] <= eps and a["verdict"] == "pass"
    assert 3.5 < c["run_epsilon"] <= 4.0  # the canary run's own ledger: the same claim, with its canaries in
    on_disk = json.loads((tmp_path / "rep" / "privacy_audit.json").read_text())
    assert on_disk["dp_audit"] == got["dp_audit"]


def test_cli_exits_3_on_a_replayable_dp_artifact(cli, digits, private_train, prior_once, seeded_noise, tmp_path):
    """DP calibration with its noise seeded (the defence removed): the replay reproduces the artifact, the
    audit fails and says why. (DP-SGD's seeded case: test_replay_check_fails_seeded_dp_sgd.)"""
    secquant.quantize(digits, _small("w8a8"), calib=private_train, dp_epsilon=1.0, out=tmp_path / "dp")
    r = cli("audit", "privacy", "--float", "builtin:digits", "--quantized", tmp_path / "dp", "--data", private_train,
            "--canaries", "2", "--shadows", "2", "--epochs", "1", "--out", tmp_path / "rep")
    assert r.exit_code == 3, r.stderr
    assert "DP audit" in r.stdout and "fail" in r.stdout
    assert "DP audit failed" in r.stderr and "not secret" in r.stderr and "Traceback" not in r.stderr
    a = json.loads((tmp_path / "rep" / "privacy_audit.json").read_text())["dp_audit"]["w8a8+dp"]
    assert a["replay"] == "fail" and a["replay_detail"]["identical_to_artifact"] and a["verdict"] == "fail"


def test_cli_user_errors_come_before_any_work(cli, assert_user_error, tmp_path):
    out = tmp_path / "r"
    assert_user_error(cli("audit", "privacy", "--float", "builtin:digits", "--canaries", "1", "--out", out), out,
                      contains=("--canaries",))
    assert_user_error(cli("audit", "privacy", "--float", "builtin:digits", "--confidence", "1.5", "--out", out), out,
                      contains=("--confidence",))
