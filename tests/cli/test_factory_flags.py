"""The factory workflow on the command line: --factory / --weights wherever a model is built or rebuilt,
--sample-shape / --sample-dtype recorded in the manifest, integer dummy inputs for token-id models, and
errors that name the flag that is missing or the keys that do not fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from secquant.errors import ModelError
from secquant.models import load_model

TINY = "tiny_factory:tiny"

# every command that rebuilds an artifact's model takes --factory; every one that builds a float model from a
# spec takes --weights (and the ones that make an artifact, --sample-shape / --sample-dtype)
FACTORY_COMMANDS = [["eval"], ["export"], ["serve"], ["integrity"], ["private-eval"], ["private-serve"],
                    ["watermark", "verify"], ["audit", "robustness"], ["audit", "bitflip"], ["audit", "divergence"]]
WEIGHTS_COMMANDS = [["quantize"], ["qat"], ["tune"], ["eval"], ["watermark", "embed"], ["watermark", "verify"],
                    ["audit", "robustness"], ["audit", "divergence"]]
SAMPLE_COMMANDS = [["quantize"], ["qat"], ["tune"], ["watermark", "embed"], ["export"]]


def _command(path: list[str]):
    import typer.main

    from secquant.cli import app

    cmd = typer.main.get_command(app)
    for name in path:
        cmd = cmd.commands[name]
    return {opt for p in cmd.params for opt in p.opts}


@pytest.mark.parametrize("path", FACTORY_COMMANDS, ids=" ".join)
def test_commands_that_rebuild_an_artifact_take_factory(path):
    assert "--factory" in _command(path)


@pytest.mark.parametrize("path", WEIGHTS_COMMANDS, ids=" ".join)
def test_commands_that_build_a_float_model_take_weights(path):
    assert "--weights" in _command(path)


@pytest.mark.parametrize("path", SAMPLE_COMMANDS, ids=" ".join)
def test_commands_that_make_inputs_take_sample_shape_and_dtype(path):
    assert {"--sample-shape", "--sample-dtype"} <= _command(path)


def _weights(tmp_path, factory, name="w.safetensors"):
    torch.manual_seed(0)
    save_file({k: v.contiguous() for k, v in factory().state_dict().items()}, str(tmp_path / name))
    return tmp_path / name


@pytest.fixture
def tiny_artifact(tmp_path, cli):
    from tiny_factory import tiny

    w = _weights(tmp_path, tiny)
    out = tmp_path / "q"
    r = cli("quantize", TINY, "--weights", w, "--preset", "w8a16", "--out", out)
    assert r.exit_code == 0, r.stderr
    return out, w


def test_export_takes_the_factory_it_asks_for(tiny_artifact, cli, assert_user_error):
    art, _ = tiny_artifact
    line = assert_user_error(cli("export", art))
    assert "--factory" in line  # the hint names a flag export has
    r = cli("export", art, "--factory", TINY)
    assert r.exit_code == 0, r.stderr
    assert (art / "model.onnx").is_file()


def test_eval_without_weights_says_weights_is_missing(tiny_artifact, cli, assert_user_error):
    art, w = tiny_artifact
    line = assert_user_error(cli("eval", art, "--factory", TINY))
    assert "--weights is missing" in line and "--against" not in line
    data = art.parent / "data.safetensors"
    save_file({"inputs": torch.randn(16, 6)}, str(data))
    r = cli("eval", art, "--factory", TINY, "--weights", w, "--data", data)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["n_samples"] == 16


def test_eval_of_a_builtin_refuses_weights(digits_artifact, cli, assert_user_error, tmp_path):
    w = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(1)}, str(w))
    line = assert_user_error(cli("eval", digits_artifact("w8a16"), "--weights", w))
    assert "builtin:digits" in line and "drop --weights" in line


def test_sample_shape_is_recorded_and_used_by_export(tmp_path, cli, assert_user_error):
    from input_factory import no_shape

    w = _weights(tmp_path, no_shape)
    bare = tmp_path / "bare"
    assert cli("quantize", "input_factory:no_shape", "--weights", w, "--preset", "w8a16", "--out", bare).exit_code == 0
    assert "--sample-shape" in assert_user_error(cli("export", bare, "--factory", "input_factory:no_shape"))
    out = tmp_path / "q"
    r = cli("quantize", "input_factory:no_shape", "--weights", w, "--preset", "w8a16", "--out", out,
            "--sample-shape", "6")
    assert r.exit_code == 0, r.stderr
    rebuild = json.loads((out / "secquant.json").read_text())["model"]["rebuild"]
    assert rebuild["sample_shape"] == [6] and rebuild["sample_dtype"] == "float32"
    r = cli("export", out, "--factory", "input_factory:no_shape")  # no shape given: the manifest's
    assert r.exit_code == 0, r.stderr
    # the artifact made without a shape exports when export is told one
    r = cli("export", bare, "--factory", "input_factory:no_shape", "--sample-shape", "6")
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("args,needle", [
    (["input_factory:no_shape", "--sample-shape", "6,x"], "--sample-shape"),
    (["input_factory:no_shape", "--sample-shape", "0"], "--sample-shape"),
    (["input_factory:no_shape", "--sample-dtype", "float16"], "--sample-dtype"),
    (["builtin:digits", "--sample-shape", "6"], "factory models"),
])
def test_bad_sample_options(tmp_path, cli, assert_user_error, args, needle):
    out = tmp_path / "q"
    line = assert_user_error(cli("quantize", *args, "--preset", "w8a16", "--out", out), out)
    assert needle in line


def _onnx_input(path):
    import onnx

    return onnx.load(str(path)).graph.input[0].type.tensor_type.elem_type


def test_token_id_model_exports_with_an_integer_input(tmp_path, cli):
    import onnx
    import onnxruntime as ort

    import secquant
    from input_factory import tokens

    w = _weights(tmp_path, tokens)
    out = tmp_path / "q"
    r = cli("quantize", "input_factory:tokens", "--weights", w, "--preset", "w8a16", "--out", out)
    assert r.exit_code == 0, r.stderr
    assert json.loads((out / "secquant.json").read_text())["model"]["rebuild"]["sample_dtype"] == "int64"
    r = cli("export", out, "--factory", "input_factory:tokens")
    assert r.exit_code == 0, r.stderr
    assert _onnx_input(out / "model.onnx") == onnx.TensorProto.INT64
    ids = torch.randint(0, 50, (5, 8), generator=torch.Generator().manual_seed(3))
    got = ort.InferenceSession(str(out / "model.onnx")).run(None, {"input": ids.numpy()})[0]
    want = secquant.load(out, factory="input_factory:tokens", allow_unsealed=True)(ids)
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-4, atol=1e-4)
    # eval on ONNX Runtime feeds a data file's ids as int64 too
    save_file({"inputs": ids}, str(tmp_path / "ids.safetensors"))
    r = cli("eval", out, "--factory", "input_factory:tokens", "--weights", w, "--data", tmp_path / "ids.safetensors",
            "--runtime", "onnx")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["mean_cosine_to_float"] > 0.99


def test_sample_dtype_from_the_attribute_or_the_flag(tmp_path, cli):
    import onnx

    from input_factory import counts

    w = _weights(tmp_path, counts)
    out = tmp_path / "counts"
    assert cli("quantize", "input_factory:counts", "--weights", w, "--preset", "w8a16", "--out", out).exit_code == 0
    assert cli("export", out, "--factory", "input_factory:counts").exit_code == 0
    assert _onnx_input(out / "model.onnx") == onnx.TensorProto.INT32  # the model's sample_dtype attribute
    out2 = tmp_path / "as-int64"
    r = cli("quantize", "input_factory:counts", "--weights", w, "--preset", "w8a16", "--out", out2,
            "--sample-dtype", "int64")  # the flag wins over the attribute
    assert r.exit_code == 0, r.stderr
    assert json.loads((out2 / "secquant.json").read_text())["model"]["rebuild"]["sample_dtype"] == "int64"
    assert cli("export", out2, "--factory", "input_factory:counts").exit_code == 0
    assert _onnx_input(out2 / "model.onnx") == onnx.TensorProto.INT64


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    from tiny_factory import tiny

    sd = tiny().state_dict()
    sd["fc1.weight"] = torch.zeros(16, 7)  # shape mismatch
    del sd["fc2.bias"], sd["fc2.weight"]  # missing
    for i in range(7):
        sd[f"extra.{i}"] = torch.zeros(1)  # unexpected, more than are shown
    save_file(sd, str(tmp_path / "w.safetensors"))
    with pytest.raises(ModelError) as ei:
        load_model(TINY, str(tmp_path / "w.safetensors"))
    msg = str(ei.value)
    assert "\n" not in msg
    assert "2 missing key(s): fc2.bias, fc2.weight" in msg
    assert "7 unexpected key(s): extra.0, extra.1" in msg and "(2 more)" in msg
    assert "1 shape mismatch(es): fc1.weight (file [16, 7], model [16, 6])" in msg


def test_integrity_and_watermark_verify_rebuild_with_factory(tiny_artifact, tmp_path, cli, assert_user_error):
    from secquant.security import keygen, seal

    art, w = tiny_artifact
    keys = keygen(tmp_path / "owner")
    sealed = seal(art, [keys.recipient.read_text().strip()], keys.sign_key, tmp_path / "q.age")
    opened = ["--identity", keys.identity, "--verify-key", keys.verify_key]
    assert "--factory" in assert_user_error(cli("integrity", sealed, *opened))
    r = cli("integrity", sealed, *opened, "--factory", TINY)
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["intact"] is True

    wm = tmp_path / "owner.wm"
    assert cli("watermark", "keygen", "--out", wm).exit_code == 0
    marked = tmp_path / "marked"
    r = cli("watermark", "embed", TINY, "--weights", w, "--preset", "w8a16", "--key", wm, "--out", marked,
            "--tau", "0.45")  # a wide band: the tiny model has few weights to carry the mark
    assert r.exit_code == 0, r.stderr
    assert "--factory" in assert_user_error(cli("watermark", "verify", marked, "--key", wm))
    # the factory rebuilds the artifact; the float model is the user's (a manifest's factory is never called)
    line = assert_user_error(cli("watermark", "verify", marked, "--key", wm, "--factory", TINY))
    assert "--float" in line
    r = cli("watermark", "verify", marked, "--key", wm, "--factory", TINY, "--float", TINY, "--weights", w)
    assert r.exit_code == 0, r.stderr
    assert "DETECTED" in r.stdout
    # the API neither: the factory the manifest names is not called to make the float reference
    import secquant
    import secquant.models.factory
    from secquant.security.watermark import WatermarkError, verify_watermark

    qm = secquant.load(marked, factory=TINY, allow_unsealed=True)

    def refuse(spec):
        raise AssertionError(f"called {spec} named by a manifest")

    mp = pytest.MonkeyPatch()
    mp.setattr(secquant.models.factory, "call_factory", refuse)
    try:
        with pytest.raises(WatermarkError, match="float_model="):
            verify_watermark(qm, wm)
    finally:
        mp.undo()
