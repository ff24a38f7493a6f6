"""`secquant export` and `secquant eval --runtime onnx` on the built-in digits model."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("onnxruntime")

from secquant.artifact import read_manifest  # noqa: E402
from secquant.artifact.checks import verify_artifact_dir  # noqa: E402


def test_export_then_eval_on_onnx_runtime(cli, digits_artifact, tmp_path):
    d = tmp_path / "w8a8"
    shutil.copytree(digits_artifact("w8a8"), d)
    r = cli("export", d, "--format", "onnx")
    assert r.exit_code == 0, r.stderr
    assert (d / "model.onnx").is_file()
    assert "model.onnx" in read_manifest(d).files
    verify_artifact_dir(d)  # the manifest's hashes still hold, model.onnx included
    assert "MatMulIntegerToFloat" in r.stdout or "int8" in r.stdout

    torch_res = json.loads(cli("eval", d).stdout)
    r = cli("eval", d, "--runtime", "onnx", "--threads", "1")
    assert r.exit_code == 0, r.stderr
    onnx_res = json.loads(r.stdout)
    assert onnx_res["runtime"].startswith("onnxruntime")
    assert onnx_res["n_samples"] == torch_res["n_samples"] == 899
    # ONNX Runtime reproduces the PyTorch integer model: same accuracy within one sample
    assert abs(onnx_res["value"] - torch_res["value"]) <= 1 / 899 + 1e-9
    assert onnx_res["onnx_size_bytes"] > 0


def test_eval_onnx_exports_on_demand(cli, digits_artifact, tmp_path):
    d = tmp_path / "w4a16"
    shutil.copytree(digits_artifact("w4a16"), d)
    r = cli("eval", d, "--runtime", "onnx")
    assert r.exit_code == 0, r.stderr
    assert json.loads(r.stdout)["value"] > 0.95
    assert "model.onnx" in read_manifest(d).files


def test_export_bad_input(cli, assert_user_error, tmp_path, digits_artifact):
    assert_user_error(cli("export", tmp_path / "missing"), contains=("not an artifact directory",))
    d = tmp_path / "a"
    shutil.copytree(digits_artifact("w8a16"), d)
    assert_user_error(cli("export", d, "--format", "tflite"), contains=("onnx",))
    assert_user_error(cli("eval", d, "--runtime", "tensorrt"), contains=("torch or onnx",))
    assert not (d / "model.onnx").exists()


def test_a_model_the_tracer_cannot_follow_is_a_user_error(digits):
    """torch.onnx's own failure becomes a SecquantError (one line from the CLI), not a traceback."""
    import pytest
    import torch

    from secquant.errors import SecquantError
    from secquant.runtime.onnx import build_onnx

    class Untraceable(torch.nn.Module):
        def forward(self, x):
            if torch.jit.is_tracing():
                raise RuntimeError("Only tuples, lists and Variables are supported as JIT inputs/outputs")
            return x

    with pytest.raises(SecquantError, match="could not be traced to ONNX.*--runtime torch"):
        build_onnx(Untraceable(), digits.adapter, digits.adapter.sample_batch())
