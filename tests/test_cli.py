"""The `secquant` command line: quantize, eval, inspect, demo; bad input exits 2 with one clear line."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

import secquant
import secquant.cli.quantize as cli_mod  # where `inspect` prints

EVAL_KEYS = ["size_bytes", "float_size_bytes", "size_ratio", "metric", "value", "float_value", "latency_ms"]
DIGITS_LAYERS = ["features.0", "features.3", "classifier.1", "classifier.3"]


def _one_json_object(stdout: str) -> dict:
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected one JSON line on stdout, got:\n{stdout}"
    obj = json.loads(lines[0])
    assert isinstance(obj, dict)
    return obj


# ------------------------------------------------------------------ quantize


def test_quantize_with_preset(cli, tmp_path, digits):
    out = tmp_path / "q"
    r = cli("quantize", "builtin:digits", "--preset", "w4a16", "--out", out)
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "secquant.json"]
    assert str(out) in r.stderr and "w4a16" in r.stderr
    qm = secquant.load(out, allow_unsealed=True)
    assert qm.manifest.recipe.name == "w4a16"
    x = digits.adapter.builtin["test_x"][:32]
    assert torch.equal(qm(x), secquant.quantize(digits, "w4a16")(x))
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


def test_quantize_with_recipe_file(cli, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: mine\nweights: {bits: 5, granularity: channel}\nignore: [classifier.3]\n")
    out = tmp_path / "q"
    r = cli("quantize", "builtin:digits", "--recipe", recipe, "--out", out)
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "secquant.json").read_text())
    assert m["recipe"]["name"] == "mine"
    assert set(m["layers"]) == {"features.0", "features.3", "classifier.1"}
    assert all(e["weight"]["args"]["bits"] == 5 for e in m["layers"].values())


def test_quantize_with_json_recipe_and_calib(cli, tmp_path, digits):
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps(secquant.PRESETS["w8a8"].model_dump(mode="json") | {"name": "static"}))
    calib = tmp_path / "calib.safetensors"
    save_file({"inputs": digits.adapter.builtin["train_x"][:40].contiguous()}, str(calib))
    out = tmp_path / "q"
    r = cli("quantize", "builtin:digits", "--recipe", recipe, "--calib", calib, "--out", out)
    assert r.exit_code == 0, r.stderr
    m = json.loads((out / "secquant.json").read_text())
    assert m["calibration"]["data"] == "raw" and m["calibration"]["num_samples"] > 0
    # the file is identified by its hash; its name only with --record-source-name (issue 14 item 7)
    assert str(calib) not in json.dumps(m) and m["calibration"]["source_sha256"] == hashlib.sha256(
        calib.read_bytes()).hexdigest()


def test_overwrite_replaces_existing_output(cli, tmp_path):
    out = tmp_path / "q"
    out.mkdir()
    (out / "old.txt").write_text("old")
    r = cli("quantize", "builtin:digits", "--preset", "w8a16", "--out", out, "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["model.safetensors", "secquant.json"]
    secquant.load(out, allow_unsealed=True)
    assert [p.name for p in tmp_path.iterdir()] == ["q"]


# ------------------------------------------------------------------ eval


def test_eval_digits_prints_one_json_object(cli, digits_artifact):
    d = digits_artifact("w8a8")
    r = cli("eval", d)
    assert r.exit_code == 0, r.stderr
    res = _one_json_object(r.stdout)
    for k in EVAL_KEYS:
        assert k in res, k
    assert res["metric"] == "accuracy"
    assert res["size_bytes"] == (d / "model.safetensors").stat().st_size
    assert res["size_ratio"] == pytest.approx(res["size_bytes"] / res["float_size_bytes"])
    assert res["size_ratio"] < 0.35
    assert res["float_value"] >= 0.95
    assert abs(res["value"] - res["float_value"]) <= 0.005
    assert res["latency_ms"] > 0


def test_eval_minilm_cosine(cli, minilm_artifact, sentences_file):
    out, _ = minilm_artifact
    r = cli("eval", out, "--data", sentences_file, "--batch-size", "8")
    assert r.exit_code == 0, r.stderr
    res = _one_json_object(r.stdout)
    for k in EVAL_KEYS:
        assert k in res, k
    assert res["metric"] == "cosine"
    assert res["n_samples"] == 16
    assert res["float_value"] == 1.0
    assert 0.98 < res["value"] <= 1.0 + 1e-6
    assert 0.2 < res["size_ratio"] < 0.4


def test_eval_against_other_model(cli, digits_artifact):
    """--against names the float model explicitly (here: the same builtin)."""
    r = cli("eval", digits_artifact("w8a16"), "--against", "builtin:digits")
    assert r.exit_code == 0, r.stderr
    assert _one_json_object(r.stdout)["metric"] == "accuracy"


# ------------------------------------------------------------------ inspect


def _inspect_with_width(cli, monkeypatch, d, width):
    monkeypatch.setattr(cli_mod, "out", Console(width=width, color_system=None))
    r = cli("inspect", d)
    assert r.exit_code == 0, r.stderr
    return r.stdout


def test_inspect_shows_per_layer_table(cli, digits_artifact, monkeypatch):
    text = _inspect_with_width(cli, monkeypatch, digits_artifact("w4a8-dynamic"), 200)
    for col in ["layer", "type", "shape", "w_bits", "w_granularity", "a_bits", "a_mode"]:
        assert col in text
    rows = {ln.split("│")[1].strip(): ln for ln in text.splitlines() if ln.count("│") > 3}
    for name in DIGITS_LAYERS:
        assert name in rows, text
        assert "group128" in rows[name] and "dynamic/token" in rows[name]
        assert "│ 4 " in rows[name] and "│ 8 " in rows[name]
    assert "w4a8-dynamic" in text and "builtin:digits" in text


def test_inspect_layer_names_legible_on_80_columns(cli, digits_artifact, monkeypatch):
    """On a standard 80-column terminal (or a pipe) the table must still show which layer is which."""
    text = _inspect_with_width(cli, monkeypatch, digits_artifact("w8a8"), 80)
    for name in DIGITS_LAYERS:
        assert name in text, f"layer name {name!r} not legible in:\n{text}"


def test_inspect_json(cli, digits_artifact):
    r = cli("inspect", digits_artifact("w8a8"), "--json")
    assert r.exit_code == 0, r.stderr
    obj = _one_json_object(r.stdout)
    assert obj["recipe"] == "w8a8" and obj["model"] == "builtin:digits"
    assert [row["layer"] for row in obj["layers"]] == DIGITS_LAYERS
    assert all(row["w_bits"] == 8 and row["w_granularity"] == "channel" for row in obj["layers"])
    assert len(obj["source"]["weights_sha256"]) == 64


def test_inspect_shows_smoothing_and_rotation(cli, digits_artifact):
    r = cli("inspect", digits_artifact("w4a16-gptq"), "--json")
    assert r.exit_code == 0, r.stderr
    rows = {row["layer"]: row for row in _one_json_object(r.stdout)["layers"]}
    assert rows["classifier.1"]["w_transform"] == "smooth+hadamard128"  # 128 inputs: rotated in one block
    assert rows["features.0"]["w_transform"] is None  # a convolution: neither


def test_presets_command(cli):
    r = cli("presets")
    assert r.exit_code == 0
    for name in ["w8a8", "w8a8-dynamic", "w8a16", "w4a16", "w4a8-dynamic"]:
        assert name in r.stdout


# ------------------------------------------------------------------ demo


def test_demo_digits(cli, tmp_path):
    out = tmp_path / "demo"
    r = cli("demo", "--model", "builtin:digits", "--out", out, "--no-privacy")  # privacy parts: tests/privacy
    assert r.exit_code == 0, r.stderr
    report = json.loads((out / "report.json").read_text())
    results = report["results"]
    speed = {x["recipe"]: x for x in report["speed"]}
    assert set(speed) == {x["recipe"] for x in results}
    for x in results:  # ONNX Runtime reproduces each artifact (same accuracy within 2 of 899 samples)
        assert abs(speed[x["recipe"]]["value"] - x["value"]) <= 2 / 899 + 1e-9
        assert speed[x["recipe"]]["runtime"].startswith("onnxruntime")
    sec = report["security"]  # sealed, opened verified, integrity and watermark exercised
    assert sec["watermark (owner key)"].startswith("detected") and sec["watermark (another key)"].startswith("not")
    assert sec["one bit flipped in memory"].startswith("detected") and (out / "digits-w8a8.age").is_file()
    assert "<h2>Security</h2>" in (out / "report.html").read_text()
    assert {x["recipe"] for x in results} == {"w8a16", "w8a8", "w8a8-dynamic", "w4a16", "w4a8-dynamic"}
    for x in results:
        assert x["model"] == "builtin:digits" and x["metric"] == "accuracy"
        for k in EVAL_KEYS:
            assert x[k] is not None, k
        assert (out / x["artifact"] / "secquant.json").is_file()
        secquant.load(out / x["artifact"], allow_unsealed=True)
    html = (out / "report.html").read_text()
    assert "<svg" in html and "</svg>" in html and "<table>" in html
    pi = report["private_inference"]  # digits-w8a8 secret-shared among 3 local parties (issue 17)
    assert pi["agreement"] == 1.0 and pi["bit_exact"] is True and "<h2>Private inference</h2>" in html
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]
    # an existing output directory is refused...
    r = cli("demo", "--model", "builtin:digits", "--preset", "w8a16", "--out", out, "--no-privacy")
    assert r.exit_code == 2 and r.stderr.strip().startswith("error:")
    assert len(json.loads((out / "report.json").read_text())["results"]) == 5
    # ...unless --overwrite
    r = cli("demo", "--model", "builtin:digits", "--preset", "w8a16", "--out", out, "--overwrite", "--no-privacy")
    assert r.exit_code == 0, r.stderr
    assert len(json.loads((out / "report.json").read_text())["results"]) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_demo_bad_preset_leaves_nothing(cli, tmp_path, assert_user_error):
    out = tmp_path / "demo"
    r = cli("demo", "--model", "builtin:digits", "--preset", "w8a16", "--preset", "w1a1", "--out", out)
    assert_user_error(r, out, contains=("w1a1",), progress_log=True)


# ------------------------------------------------------------------ bad input


@pytest.fixture
def bad(tmp_path):
    """Files for the bad-input matrix."""
    g = torch.Generator().manual_seed(0)
    from tiny_factory import tiny

    def weights(name, value=None):
        sd = {k: torch.randn(v.shape, generator=g) for k, v in tiny().state_dict().items()}
        if value is not None:
            sd["fc1.weight"][0, 1] = value
        save_file(sd, str(tmp_path / name))
        return tmp_path / name

    files = {
        "nan": weights("nan.safetensors", float("nan")),
        "inf": weights("inf.safetensors", float("-inf")),
        "ok": weights("ok.safetensors"),
    }
    (tmp_path / "bits.yaml").write_text("weights:\n  bits: 12\n")
    (tmp_path / "unknown.yaml").write_text("weights:\n  bits: 8\n  bitz: 4\n")
    (tmp_path / "group.yaml").write_text("weights: {bits: 4, granularity: group}\n")
    (tmp_path / "invalid.yaml").write_text("weights:\n  bits: [8\n")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    np.save(tmp_path / "zero.npy", np.zeros((0, 1, 8, 8), dtype=np.float32))
    save_file({"inputs": torch.rand(12, 3, 5)}, str(tmp_path / "shape.safetensors"))
    files.update({n: tmp_path / n for n in ["bits.yaml", "unknown.yaml", "group.yaml", "invalid.yaml",
                                            "empty.safetensors", "zero.npy", "shape.safetensors"]})
    return files


BAD_QUANTIZE = {
    # id: (argv before --out (templated), substrings expected in the error line)
    "unknown-preset": (["builtin:digits", "--preset", "w3a3"], ["w3a3", "w8a8-dynamic", "w4a16"]),
    "recipe-bits": (["builtin:digits", "--recipe", "{bits.yaml}"], ["weights.bits"]),
    "recipe-unknown-field": (["builtin:digits", "--recipe", "{unknown.yaml}"], ["weights.bitz"]),
    "recipe-group": (["builtin:digits", "--recipe", "{group.yaml}"], ["group_size"]),
    "recipe-invalid-yaml": (["builtin:digits", "--recipe", "{invalid.yaml}"], ["YAML"]),
    "recipe-missing": (["builtin:digits", "--recipe", "nope.yaml"], ["nope.yaml"]),
    "preset-and-recipe": (["builtin:digits", "--preset", "w8a8", "--recipe", "{bits.yaml}"], ["--preset"]),
    "no-preset-no-recipe": (["builtin:digits"], ["--preset"]),
    "no-quantizable-layer": (["tiny_factory:relu_only", "--preset", "w8a16"], ["no quantizable layer"]),
    "nan-weights": (["tiny_factory:tiny", "--weights", "{nan}", "--preset", "w8a16"], ["fc1.weight", "NaN"]),
    "inf-weights": (["tiny_factory:tiny", "--weights", "{inf}", "--preset", "w8a8-dynamic"], ["fc1.weight", "Inf"]),
    "calib-missing": (["builtin:digits", "--preset", "w8a8", "--calib", "missing.safetensors"],
                      ["missing.safetensors"]),
    "calib-empty": (["builtin:digits", "--preset", "w8a8", "--calib", "{empty.safetensors}"], ["empty.safetensors"]),
    "calib-zero-samples": (["builtin:digits", "--preset", "w8a8", "--calib", "{zero.npy}"], ["zero.npy", "empty"]),
    "calib-wrong-shape": (["builtin:digits", "--preset", "w8a8", "--calib", "{shape.safetensors}"],
                          ["shape.safetensors", "(1, 8, 8)"]),
    "factory-static-no-calib": (["tiny_factory:tiny", "--weights", "{ok}", "--preset", "w8a8"], ["--calib"]),
    "unknown-model": (["builtin:resnet", "--preset", "w8a8"], ["builtin:resnet"]),
    "weights-missing": (["tiny_factory:tiny", "--weights", "nope.safetensors", "--preset", "w8a16"],
                        ["nope.safetensors"]),
}


def _argv(template, files, tmp_path):
    out = []
    for a in template:
        if a.startswith("{") and a.endswith("}"):
            out.append(str(files[a[1:-1]]))
        elif a.endswith((".yaml", ".safetensors")) and "/" not in a:
            out.append(str(tmp_path / a))
        else:
            out.append(a)
    return out


@pytest.mark.parametrize("case", list(BAD_QUANTIZE))
def test_quantize_bad_input(cli, tmp_path, bad, assert_user_error, case):
    template, needles = BAD_QUANTIZE[case]
    out = tmp_path / "sub" / "out"
    r = cli("quantize", *_argv(template, bad, tmp_path), "--out", out)
    assert_user_error(r, out, contains=tuple(needles))
    assert not (tmp_path / "sub").exists() or list((tmp_path / "sub").iterdir()) == []


def test_quantize_existing_output(cli, tmp_path, assert_user_error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    r = cli("quantize", "builtin:digits", "--preset", "w8a16", "--out", out)
    assert_user_error(r, out, existed=True, contains=(str(out), "exists"))
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    assert (out / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("name", ["[v2]", "run[/]x"])
def test_error_line_shows_paths_verbatim(cli, tmp_path, assert_user_error, name):
    """Paths with brackets are user data, not console markup: shown as they are, no crash."""
    out = tmp_path / name  # "run[/]x" is the directory "]x" inside "run["
    out.mkdir(parents=True)
    r = cli("quantize", "builtin:digits", "--preset", "w8a16", "--out", out)
    assert_user_error(r, out, existed=True, contains=(str(out),))


def test_eval_and_inspect_bad_artifact(cli, tmp_path, digits_artifact, assert_user_error):
    assert_user_error(cli("eval", tmp_path), contains=("secquant.json",))
    assert_user_error(cli("inspect", tmp_path / "missing"), contains=("missing",))
    d = tmp_path / "art"
    shutil.copytree(digits_artifact("w8a16"), d)
    m = json.loads((d / "secquant.json").read_text())
    m["format_version"] = 99
    (d / "secquant.json").write_text(json.dumps(m))
    assert_user_error(cli("eval", d), contains=("format_version",))
    assert_user_error(cli("inspect", d), contains=("format_version",))


def test_eval_bad_data_file(cli, tmp_path, digits_artifact, assert_user_error):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    assert_user_error(cli("eval", digits_artifact("w8a16"), "--data", tmp_path / "empty.safetensors"),
                      contains=("empty.safetensors",))


# ------------------------------------------------------------------ real processes (no traceback, exit 2)


@pytest.mark.parametrize("case", ["unknown-preset", "nan-weights", "recipe-invalid-yaml"])
def test_bad_input_in_a_real_process(secquant_proc, tmp_path, bad, assert_user_error, case):
    template, needles = BAD_QUANTIZE[case]
    out = tmp_path / "out"
    r = secquant_proc("quantize", *_argv(template, bad, tmp_path), "--out", out)
    assert_user_error(r, out, contains=tuple(needles))
    assert r.stdout == ""
