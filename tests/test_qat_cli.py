"""`secquant qat` and `secquant tune` from the shell."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

import secquant
from secquant.cli import app


def test_qat_cli_writes_checkpoints_and_an_artifact(tmp_path, monkeypatch):
    monkeypatch.setenv("SECQUANT_CACHE", str(tmp_path / "cache"))
    out, ck = tmp_path / "q", tmp_path / "ck"
    r = CliRunner().invoke(app, ["qat", "builtin:digits", "--preset", "w2a8", "--epochs", "3", "--out", str(out),
                                 "--checkpoints", str(ck)])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["training"]["epochs"] == 3 and len(summary["training"]["losses"]) == 3
    assert sorted(p.name for p in ck.iterdir()) == [f"epoch-{i}.safetensors" for i in (1, 2, 3)]
    qm = secquant.load(out, allow_unsealed=True)
    assert qm.manifest.training["epochs"] == 3
    assert all(e.weight.args.bits == 2 for e in qm.manifest.layers.values())


def test_qat_refuses_an_encoder_and_bad_epochs(tmp_path):
    r = CliRunner().invoke(app, ["qat", "builtin:minilm", "--preset", "w4a4", "--epochs", "1", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "training set" in r.output
    r = CliRunner().invoke(app, ["qat", "builtin:digits", "--preset", "w4a4", "--epochs", "0", "--out", str(tmp_path / "y")])
    assert r.exit_code == 2
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_tune_cli_exit_codes(tmp_path, monkeypatch):
    monkeypatch.setenv("SECQUANT_CACHE", str(tmp_path / "cache"))
    ok = CliRunner().invoke(app, ["tune", "builtin:digits", "--max-drop", "1", "--out", str(tmp_path / "t")])
    assert ok.exit_code == 0, ok.output
    s = json.loads(ok.stdout.strip().splitlines()[-1])
    assert s["goal_met"] and s["drop"] <= 1.0
    bad = CliRunner().invoke(app, ["tune", "builtin:digits", "--max-drop", "0", "--size-budget", "1kB",
                                   "--out", str(tmp_path / "t2")])
    assert bad.exit_code == 3  # goal not met, best model saved anyway
    assert (tmp_path / "t2" / "model.safetensors").is_file()
    r = CliRunner().invoke(app, ["tune", "builtin:digits", "--max-drop", "1", "--size-budget", "lots",
                                 "--out", str(tmp_path / "t3")])
    assert r.exit_code == 2 and "size-budget" in r.output


def test_qat_seed_reproduces_a_non_private_run(tmp_path):
    """--seed: two non-private runs with the same seed release the same weights (and the seed is recorded);
    with --dp-epsilon a seed is refused (tests/privacy/test_dp_training.py)."""
    from safetensors.torch import load_file

    outs = [tmp_path / "a", tmp_path / "b", tmp_path / "c"]
    for out, seed in zip(outs, ["3", "3", "4"]):
        r = CliRunner().invoke(app, ["qat", "builtin:digits", "--preset", "w8a16", "--epochs", "1", "--seed", seed,
                                     "--out", str(out)])
        assert r.exit_code == 0, r.output
    a, b, c = (load_file(str(o / "model.safetensors")) for o in outs)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    assert json.loads((outs[0] / "secquant.json").read_text())["training"]["seed"] == 3
