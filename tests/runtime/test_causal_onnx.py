"""ONNX export of a quantized causal LM decoder (input_ids + attention_mask -> logits, no KV cache): ONNX Runtime
reproduces the PyTorch quantized model's logits, and every quantized Linear runs on an integer kernel."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from secquant.errors import SecquantError
from secquant.quant.algorithms.pipeline import quantize_model
from secquant.quant.modules import QuantLinear
from secquant.recipes.presets import PRESETS
from secquant.runtime.onnx import export_causal_onnx, export_info
from tiny_causal_export import byte_batch, sentences, tiny_causal_lm

# Weight-only layers: MatMulNBits dequantizes exactly the codes PyTorch dequantizes; only the float summation
# order differs (measured max |diff| ~2e-7 on logits of magnitude ~5).
ATOL = 1e-4


def _quantized(family: str, preset: str):
    model = tiny_causal_lm(family)
    calib = [byte_batch(sentences()[100:116])]
    quantize_model(model, PRESETS[preset], lambda: iter(calib), lambda m, b: m(**b).logits)
    return model


def _ort_logits(path, batch):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["input_ids", "attention_mask"]
    return sess.run(None, {k: batch[k].numpy().astype(np.int64) for k in ("input_ids", "attention_mask")})[0]


@pytest.mark.parametrize("family,preset,bits", [("llama", "w4a16", 4), ("gpt2", "w8a16", 8), ("qwen2", "w3a16", 3)])
def test_ort_reproduces_weight_only_logits(tmp_path, family, preset, bits):
    model = _quantized(family, preset)
    path = export_causal_onnx(model, None, tmp_path / "decoder.onnx")  # traced on int64 dummy ids (2 x 8)
    # a held-out batch of another shape (batch and sequence are dynamic), right-padded
    batch = byte_batch(sentences()[:5], length=24)
    with torch.no_grad():
        ref = model(**batch).logits.numpy()
    got = _ort_logits(path, batch)
    valid = batch["attention_mask"].numpy().astype(bool)
    assert got.shape == ref.shape
    assert np.abs(got - ref)[valid].max() <= ATOL
    # every quantized decoder Linear (and the head) is one MatMulNBits node on its integer codes
    linears = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    nodes = [n for n in onnx.load(str(path)).graph.node if n.op_type == "MatMulNBits"]
    assert {n.name.removeprefix("lm.").removesuffix(".MatMulNBits") for n in nodes} == linears
    expect_bits = 4 if bits == 3 else bits  # 3-bit codes are stored in the 4-bit kernel
    assert all(a.i == expect_bits for n in nodes for a in n.attribute if a.name == "bits")
    assert not any(n.op_type == "MatMul" and "proj" in n.name for n in onnx.load(str(path)).graph.node)
    info = export_info(path)
    assert info.kind == "causal-lm" and info.output == "logits"
    assert {r.name for r in info.layers if r.kernel == "nbits"} >= linears


def test_w8a8_dynamic_runs_integer_gemms(tmp_path):
    model = _quantized("llama", "w8a8-dynamic")
    path = export_causal_onnx(model, byte_batch(sentences()[:2], 16), tmp_path / "d.onnx")
    batch = byte_batch(sentences()[5:9], length=20)
    with torch.no_grad():
        ref = model(**batch).logits.numpy()
    got = _ort_logits(path, batch)
    valid = batch["attention_mask"].numpy().astype(bool)
    cos = (got[valid] * ref[valid]).sum(-1) / np.linalg.norm(got[valid], axis=-1) / np.linalg.norm(ref[valid], axis=-1)
    assert cos.min() > 0.999  # dynamic per-token rounding may flip a code where float sums differ
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert ops.count("MatMulIntegerToFloat") == sum(isinstance(m, QuantLinear) for m in model.modules())


def test_bad_sample_refused(tmp_path):
    model = _quantized("llama", "w8a16")
    with pytest.raises(SecquantError, match="integer"):
        export_causal_onnx(model, {"input_ids": torch.rand(2, 8)}, tmp_path / "x.onnx")
    with pytest.raises(SecquantError, match="vocabulary"):
        export_causal_onnx(model, {"input_ids": torch.full((1, 4), 999)}, tmp_path / "x.onnx")
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_cache_decoding_matches_full_sequence(tmp_path, family):
    """Prefill with an empty past, then one token per step feeding the presents back: the logits of every step
    are those of the whole sequence run at once by PyTorch."""
    model = _quantized(family, "w4a16-rtn")
    path = export_causal_onnx(model, None, tmp_path / "kv.onnx", kv_cache=True)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    past_names = [i.name for i in sess.get_inputs()][2:]
    assert past_names[:2] == ["past_key_values.0.key", "past_key_values.0.value"] and len(past_names) == 4
    assert [o.name for o in sess.get_outputs()][:2] == ["logits", "present.0.key"]
    full = byte_batch(sentences()[3:5], length=20)["input_ids"]  # two rows, no padding in the first 20 bytes
    with torch.no_grad():
        ref = model(input_ids=full).logits.numpy()
    shapes = {i.name: i.shape for i in sess.get_inputs()}
    past = {n: np.zeros((2, shapes[n][1], 0, shapes[n][3]), np.float32) for n in past_names}
    got, seen = [], 0
    for chunk in [full[:, :12]] + [full[:, i:i + 1] for i in range(12, 20)]:
        seen += chunk.shape[1]
        res = sess.run(None, {"input_ids": chunk.numpy(), "attention_mask": np.ones((2, seen), np.int64), **past})
        got.append(res[0])
        past = dict(zip(past_names, res[1:]))
    assert past[past_names[0]].shape[2] == 20
    assert np.abs(np.concatenate(got, 1) - ref).max() <= ATOL
    assert sum(n.op_type == "MatMulNBits" for n in onnx.load(str(path)).graph.node) == sum(
        isinstance(m, QuantLinear) for m in model.modules())
