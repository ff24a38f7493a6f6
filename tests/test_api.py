"""The Python API: secquant.quantize / load / evaluate."""

from __future__ import annotations

import pytest
import torch

import secquant
from secquant.errors import ModelError, OutputExistsError, RecipeError
from secquant.models.digits import splits


def _acc(fn) -> float:
    s = splits()
    with torch.no_grad():
        return (fn(s["test_x"]).argmax(-1) == s["test_y"]).float().mean().item()


def test_w8a8_static_accuracy_within_half_a_point(digits):
    qm = secquant.quantize("builtin:digits", "w8a8")
    assert qm.manifest.calibration.data == "raw"
    fp32 = _acc(digits.module)
    q = _acc(qm)
    assert abs(q - fp32) <= 0.005, (q, fp32)


def test_in_memory_quantized_model_describes_layers(digits):
    """quantize() without out= returns a model whose .layers() works like a loaded one's."""
    qm = secquant.quantize(digits, "w8a8")
    rows = qm.layers()
    assert {r["layer"] for r in rows} == {"features.0", "features.3", "classifier.1", "classifier.3"}
    assert all(r["w_bits"] == 8 and r["a_mode"] == "static/percentile" for r in rows)


def test_in_memory_quantized_model_evaluates(digits):
    """secquant.evaluate() accepts a quantized model that was not saved (size fields are then None)."""
    qm = secquant.quantize(digits, "w8a8")
    res = secquant.evaluate(qm)
    assert res["metric"] == "accuracy"
    assert res["value"] == pytest.approx(_acc(qm)) and res["float_value"] == pytest.approx(_acc(digits.module))


@pytest.mark.parametrize("preset,tol", [("w8a16", 0.005), ("w8a8-dynamic", 0.01), ("w4a16", 0.03),
                                        ("w4a8-dynamic", 0.03)])
def test_other_presets_keep_accuracy(digits, preset, tol):
    assert abs(_acc(secquant.quantize(digits, preset)) - _acc(digits.module)) <= tol


def test_quantize_does_not_touch_the_float_model(digits):
    before = {k: v.clone() for k, v in digits.module.state_dict().items()}
    secquant.quantize(digits, "w4a16")
    after = digits.module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(type(m).__module__.startswith("secquant.quant") for m in digits.module.modules())


def test_evaluate_saved_artifact(digits_artifact):
    qm = secquant.load(digits_artifact("w8a16"), allow_unsealed=True)
    res = secquant.evaluate(qm)
    for key in ["size_bytes", "float_size_bytes", "size_ratio", "metric", "value", "float_value", "latency_ms"]:
        assert key in res, key
    assert res["size_bytes"] == (digits_artifact("w8a16") / "model.safetensors").stat().st_size
    assert res["size_ratio"] == pytest.approx(res["size_bytes"] / res["float_size_bytes"])
    assert 0.2 < res["size_ratio"] < 0.4
    assert res["metric"] == "accuracy" and res["n_samples"] == 899
    assert res["latency_ms"] > 0


def test_plain_directory_loads_only_with_explicit_opt_in(digits_artifact):
    with pytest.raises(secquant.SecquantError, match="allow_unsealed=True"):
        secquant.load(digits_artifact("w8a16"))
    assert secquant.load(digits_artifact("w8a16"), allow_unsealed=True).manifest.recipe.name == "w8a16"


def test_evaluate_against_explicit_module(digits_artifact, digits):
    qm = secquant.load(digits_artifact("w8a16"), allow_unsealed=True)
    res = secquant.evaluate(qm, against=digits.module)
    assert res["float_value"] >= 0.95


def test_quantize_recipe_object_and_file(digits, tmp_path):
    r = secquant.Recipe(name="w6", weights=secquant.QuantArgs(bits=6, granularity="channel"),
                        ignore=["features.0"])
    qm = secquant.quantize(digits, r, out=tmp_path / "w6")
    assert set(qm.manifest.layers) == {"features.3", "classifier.1", "classifier.3"}
    assert all(e.weight.args.bits == 6 for e in qm.manifest.layers.values())
    assert type(qm.module.features[0]).__name__ == "Conv2d"
    (tmp_path / "r.yaml").write_text("name: w6\nweights: {bits: 6, granularity: channel}\nignore: [features.0]\n")
    qm2 = secquant.quantize(digits, tmp_path / "r.yaml")
    x = splits()["test_x"][:32]
    assert torch.equal(qm(x), qm2(x))


def test_quantize_errors(digits, tmp_path):
    with pytest.raises(RecipeError, match="w8a8-dynamic"):
        secquant.quantize(digits, "int3")
    (tmp_path / "exists").mkdir()
    with pytest.raises(OutputExistsError):
        secquant.quantize(digits, "w8a16", out=tmp_path / "exists")
    with pytest.raises(RecipeError):
        secquant.quantize(digits, tmp_path / "missing.yaml")


def test_ignore_everything_is_no_quantizable_layer(digits):
    r = secquant.Recipe(weights=secquant.QuantArgs(bits=8), ignore=["*"])
    with pytest.raises(ModelError, match="no quantizable layer"):
        secquant.quantize(digits, r)


def test_quantize_plain_module():
    from tiny_factory import tiny

    m = tiny()
    qm = secquant.quantize(m, "w8a8-dynamic")
    assert set(qm.manifest.layers) == {"fc1", "fc2"}
    assert qm(torch.randn(2, 6)).shape == (2, 3)
    with pytest.raises(ModelError):
        qm.encode(["hello"])


def test_nan_in_buffer_refused():
    from torch import nn

    m = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    m[1].running_var[0] = float("nan")
    with pytest.raises(ModelError, match="running_var"):
        secquant.quantize(m, "w8a16")


def test_lazy_public_names_are_the_api_functions_whatever_was_imported_first():
    """secquant's names load on first use (sealing runs without torch); a submodule of the same name
    must never shadow one (the package attribute would become the module)."""
    import importlib
    import pkgutil

    for info in pkgutil.iter_modules(secquant.__path__):
        importlib.import_module(f"secquant.{info.name}")
    for name in secquant.__all__:
        value = getattr(secquant, name)
        assert not isinstance(value, type(secquant)), f"secquant.{name} is a module, not the public object"
    from secquant import api, recipes, tuning

    assert secquant.evaluate is api.evaluate and secquant.quantize is api.quantize and secquant.load is api.load
    assert secquant.PRESETS is recipes.PRESETS and secquant.tune is tuning.tune


def test_sealing_and_opening_do_not_import_torch(tmp_path):
    import subprocess
    import sys

    code = ("import sys\nimport secquant.cli\nfrom secquant.security import seal, open_sealed, reseal, keygen\n"
            "import secquant.security.checksums\nprint('torch' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "False", r.stderr
