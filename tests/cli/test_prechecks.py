"""Everything the arguments allow is checked before the (slow) model load: the loader is patched to record
its calls, and an argument error must be reported (one line, exit 2) without it ever being called."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

TINY = "tiny_factory:tiny"


@pytest.fixture
def loads(monkeypatch):
    """Calls of the model loaders (float models and artifacts); they still work, so a check that runs too
    late would still report its error and only this record would tell."""
    import secquant.api
    import secquant.models.factory

    calls: list[str] = []

    def recorded(name, fn):
        def wrapper(*a, **k):
            calls.append(name)
            return fn(*a, **k)
        return wrapper

    monkeypatch.setattr(secquant.api, "load_model", recorded("load_model", secquant.api.load_model))
    monkeypatch.setattr(secquant.api, "load_artifact", recorded("load_artifact", secquant.api.load_artifact))
    monkeypatch.setattr(secquant.models.factory, "call_factory",
                        recorded("call_factory", secquant.models.factory.call_factory))
    return calls


@pytest.fixture
def weights(tmp_path):
    from tiny_factory import tiny

    save_file(tiny().state_dict(), str(tmp_path / "w.safetensors"))
    return tmp_path / "w.safetensors"


def test_missing_calib_is_reported_before_the_model_loads(tmp_path, cli, assert_user_error, loads, weights):
    out = tmp_path / "q"
    line = assert_user_error(cli("quantize", TINY, "--weights", weights, "--preset", "w8a8", "--out", out), out)
    assert "--calib" in line and "w8a8" in line
    assert loads == []
    # the check is not a blanket refusal: with calibration data the same command loads and quantizes
    calib = tmp_path / "calib.safetensors"
    save_file({"inputs": torch.randn(32, 6)}, str(calib))
    r = cli("quantize", TINY, "--weights", weights, "--preset", "w8a8", "--out", out, "--calib", calib)
    assert r.exit_code == 0, r.stderr
    assert "load_model" in loads


@pytest.mark.parametrize("case", ["out-exists", "weights-missing", "calib-missing", "dp-delta-alone",
                                  "dp-with-synthetic", "unknown-preset", "bad-recipe", "bad-sample-shape",
                                  "identity-missing"])
def test_quantize_argument_errors_come_first(tmp_path, cli, assert_user_error, loads, weights, case):
    out = tmp_path / "q"
    existed = case == "out-exists"
    if existed:
        out.mkdir()
    bad_recipe = tmp_path / "r.yaml"
    bad_recipe.write_text("name: [unclosed\n")
    args = {"out-exists": ["--preset", "w8a16"],
            "weights-missing": ["--preset", "w8a16", "--weights", tmp_path / "nope.safetensors"],
            "calib-missing": ["--preset", "w8a8", "--calib", tmp_path / "nope.safetensors"],
            "dp-delta-alone": ["--preset", "w8a8", "--calib", "synthetic", "--dp-delta", "1e-6"],
            "dp-with-synthetic": ["--preset", "w8a8", "--calib", "synthetic", "--dp-epsilon", "1"],
            "unknown-preset": ["--preset", "w9a9"],
            "bad-recipe": ["--recipe", bad_recipe],
            "bad-sample-shape": ["--preset", "w8a16", "--sample-shape", "six"],
            "identity-missing": ["--preset", "w8a8", "--calib", tmp_path / "c.age", "--identity", tmp_path / "k"],
            }[case]
    if case != "weights-missing":
        args += ["--weights", weights]
    if case == "identity-missing":
        (tmp_path / "c.age").write_bytes(b"x")
    assert_user_error(cli("quantize", TINY, "--out", out, *args), out, existed=existed)
    assert loads == []


def test_eval_argument_errors_come_first(tmp_path, cli, assert_user_error, loads, digits_artifact):
    art = digits_artifact("w8a16")
    loads.clear()
    line = assert_user_error(cli("eval", art, "--data", tmp_path / "nope.safetensors"))
    assert "--data" in line
    line = assert_user_error(cli("eval", art, "--runtime", "tpu"))
    assert "tpu" in line
    assert loads == []
