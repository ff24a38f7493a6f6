"""Accuracy-driven mixed-precision tuning (secquant.tuning.tune) on the built-in digits CNN."""

from __future__ import annotations

import json
import time

import pytest

import secquant
from secquant.errors import OutputExistsError, RecipeError
from secquant.tuning import TuneResult, candidate_args, tune

LAYERS = ["features.0", "features.3", "classifier.1", "classifier.3"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """SECQUANT_CACHE points at a fresh dir for this module: the digits CNN trains into it."""
    d = tmp_path_factory.mktemp("tuning-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SECQUANT_CACHE", str(d))
        yield d


@pytest.fixture(scope="module")
def handle(cache):
    from secquant.models import load_model

    h = load_model("builtin:digits")
    assert (cache / "digits-cnn-v1.safetensors").is_file()
    return h


@pytest.fixture(scope="module")
def tuned(cache, handle, tmp_path_factory) -> tuple[TuneResult, object]:
    """builtin:digits tuned to max_drop=1 point (spec string: loaded from the module's cache), saved."""
    out = tmp_path_factory.mktemp("tuned") / "digits-tuned"
    t0 = time.perf_counter()
    res = tune("builtin:digits", max_drop=1.0, out=out, log=None)
    return res, out, time.perf_counter() - t0


def _manifest(out) -> dict:
    return json.loads((out / "secquant.json").read_text())


def test_digits_meets_goal_and_is_smaller_than_w8a8(tuned, tmp_path):
    res, out, seconds = tuned
    assert seconds < 30, seconds
    assert res.goal_met is True and res.summary["goal_met"] is True
    assert res.summary["statement"].startswith("goal met")
    assert res.summary["metric"] == "accuracy" and res.summary["max_drop"] == 1.0
    assert res.summary["drop"] <= 1.0
    # Independently: reload the artifact and evaluate on the held-out split.
    ev = secquant.evaluate(secquant.load(out, allow_unsealed=True))
    assert ev["n_samples"] == res.summary["eval_samples"] == 899
    drop_points = 100.0 * (ev["float_value"] - ev["value"])
    assert drop_points <= 1.0 + 1e-9, drop_points
    assert drop_points == pytest.approx(res.summary["drop"], abs=1e-4)
    assert 100.0 * ev["float_value"] == pytest.approx(res.summary["float_value"], abs=1e-4)
    # Smaller than uniform w8a8 and than the all-8-bit start.
    secquant.quantize("builtin:digits", "w8a8", out=tmp_path / "w8a8")
    w8a8 = (tmp_path / "w8a8" / "model.safetensors").stat().st_size
    size = (out / "model.safetensors").stat().st_size
    assert size == res.summary["size_bytes"] == ev["size_bytes"]
    assert size < w8a8, (size, w8a8)
    assert size < 0.6 * w8a8, (size, w8a8)  # most layers went below 8 bits
    assert res.summary["size_ratio"] == pytest.approx(size / res.summary["float_size_bytes"], abs=1e-6)
    assert any(b != 8 for b in res.summary["bits_per_layer"].values())


def test_manifest_records_bits_per_layer(tuned):
    res, out, _ = tuned
    m = _manifest(out)
    t = m["tuning"]
    assert set(t["bits_per_layer"]) == set(LAYERS)
    assert t["bits_per_layer"] == res.summary["bits_per_layer"]
    assert t["goal_met"] is True and t["statement"] == res.summary["statement"]
    for key in ("metric", "max_drop", "float_value", "value", "drop", "size_bytes", "float_size_bytes",
                "size_ratio", "sensitivity", "seconds"):
        assert key in t, key
    assert t["size_bytes"] == (out / "model.safetensors").stat().st_size
    for name, bits in t["bits_per_layer"].items():
        if bits == "float":
            assert name not in m["layers"]
        else:
            args = m["layers"][name]["weight"]["args"]
            assert args["bits"] == bits
            assert args == candidate_args(bits).model_dump(mode="json")
    rows = {r["layer"]: r for r in secquant.load(out, allow_unsealed=True).layers()}
    assert {n: r["w_bits"] for n, r in rows.items()} == {n: b for n, b in t["bits_per_layer"].items() if b != "float"}
    # One override per layer, exact names, in the recorded recipe.
    pats = [o["pattern"] for o in m["recipe"]["overrides"]]
    assert sorted(pats) == sorted(LAYERS)
    assert m["recipe"]["activations"] is None


def test_sensitivity_table(tuned):
    res, _, _ = tuned
    sens = res.summary["sensitivity"]
    assert set(sens) == set(LAYERS)
    for name, row in sens.items():
        assert set(row) == {"8", "4", "3", "2"}
        assert abs(row["8"]) <= 1.0, (name, row)  # int8 per channel barely moves accuracy
    assert res.summary["tuning_samples"] == 256
    assert res.summary["verifications"] >= 2
    assert res.summary["stopped"] == "converged"
    # The result is a regular QuantizedModel with the same manifest.
    assert res.model.manifest.tuning["bits_per_layer"] == res.summary["bits_per_layer"]
    assert res.model.manifest.recipe == res.recipe


def test_tiny_size_budget_is_not_met_but_saved(handle, tmp_path):
    out = tmp_path / "tiny"
    res = tune(handle, max_drop=1.0, size_budget=1000, out=out, log=None)
    assert res.goal_met is False
    st = res.summary["statement"]
    assert st.startswith("goal NOT met") and "size_budget 1000" in st and "saved anyway" in st
    assert (out / "model.safetensors").is_file()
    m = _manifest(out)
    assert m["tuning"]["goal_met"] is False and m["tuning"]["size_budget"] == 1000
    assert (out / "model.safetensors").stat().st_size > 1000
    # the drop itself is within tolerance: only the size is missed; the artifact loads and runs
    assert res.summary["drop"] <= 1.0
    assert secquant.evaluate(secquant.load(out, allow_unsealed=True))["n_samples"] == 899


def test_impossible_tolerance_keeps_best_model(handle, tmp_path):
    """Zero drop with 2-bit weights only (and a byte budget nothing meets): best found is saved anyway."""
    out = tmp_path / "impossible"
    res = tune(handle, max_drop=-0.0, candidates=(2,), size_budget=100, out=out, log=None)
    assert res.goal_met is False
    assert res.summary["statement"].startswith("goal NOT met")
    assert "saved anyway" in res.summary["statement"]
    bits = res.summary["bits_per_layer"]
    assert set(bits.values()) <= {2, "float"} and 2 in bits.values()
    m = _manifest(out)
    assert m["tuning"]["goal_met"] is False
    for name, b in bits.items():
        assert (name in m["layers"]) == (b == 2)
    skips = {o["pattern"] for o in m["recipe"]["overrides"] if o["skip"]}
    assert skips == {n for n, b in bits.items() if b == "float"}
    secquant.load(out, allow_unsealed=True)


def test_unmet_tolerance_reports_the_drop(handle):
    """No drop allowed, 2-bit weights only: even with the most sensitive layers in float the digits CNN
    loses accuracy, so the smallest drop found is kept (one layer always stays quantized)."""
    res = tune(handle, max_drop=0.0, candidates=(2,), log=None)
    assert res.goal_met is False
    assert res.summary["drop"] > 0
    assert "> max_drop 0" in res.summary["statement"] and "returned anyway" in res.summary["statement"]
    assert list(res.summary["bits_per_layer"].values()).count(2) >= 1
    assert res.model.path is None


@pytest.mark.parametrize("kwargs,match", [
    ({"max_drop": 1.0, "metric": "f1"}, "unknown metric 'f1'"),
    ({"max_drop": -0.5}, "max_drop must be >= 0"),
    ({"max_drop": 1.0, "candidates": (1, 4)}, "between 2 and 8"),
    ({"max_drop": 1.0, "candidates": ()}, "non-empty"),
    ({"max_drop": 1.0, "size_budget": 0}, "size_budget"),
    ({"max_drop": 1.0, "time_budget": -1}, "time_budget"),
])
def test_bad_arguments(handle, kwargs, match):
    with pytest.raises(RecipeError, match=match):
        tune(handle, log=None, **kwargs)


def test_bad_metric_fails_before_loading_the_model():
    with pytest.raises(RecipeError, match="'accuracy'.*'cosine'"):
        tune("builtin:no-such-model", max_drop=1.0, metric="top5", log=None)


def test_existing_output_is_refused_before_tuning(handle, tmp_path):
    out = tmp_path / "exists"
    out.mkdir()
    t0 = time.perf_counter()
    with pytest.raises(OutputExistsError):
        tune(handle, max_drop=1.0, out=out, log=None)
    assert time.perf_counter() - t0 < 1.0


def test_time_budget_is_respected(handle, tuned):
    full = tuned[0].summary
    t0 = time.perf_counter()
    res = tune(handle, max_drop=1.0, time_budget=0.0, log=None)
    elapsed = time.perf_counter() - t0
    s = res.summary
    assert s["stopped"] == "time_budget" and "time budget" in s["statement"]
    assert s["verifications"] == 1  # only the all-8-bit start was checked
    assert s["verifications"] < full["verifications"]
    assert set(s["bits_per_layer"].values()) == {8}
    assert res.goal_met is True  # int8 everywhere is within one point on digits
    assert elapsed < 5.0 and s["seconds"] <= elapsed + 0.01
    res2 = tune(handle, max_drop=1.0, time_budget=0.3, log=None)
    assert res2.summary["seconds"] < 0.3 + 3.0


def test_log_and_progress_are_called(handle):
    lines, labels = [], []

    def progress(label, total):
        labels.append(label)
        return lambda n: None

    res = tune(handle, max_drop=2.0, candidates=(8, 4), log=lines.append, progress=progress)
    assert lines and lines[-1] == res.summary["statement"]
    assert "measuring sensitivity" in labels and "searching bits" in labels
    assert set(res.summary["bits_per_layer"].values()) <= {8, 4, "float"}
    assert res.summary["candidates"] == [8, 4]
