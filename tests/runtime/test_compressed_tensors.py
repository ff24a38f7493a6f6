"""compressed-tensors export: transformers (with the compressed-tensors package) loads the directory on CPU and
gives the logits of secquant's quantized model; what the format cannot express is refused."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("compressed_tensors")

from secquant.errors import SecquantError  # noqa: E402
from secquant.quant.algorithms.pipeline import quantize_model  # noqa: E402
from secquant.quant.schema import QuantArgs, Recipe  # noqa: E402
from secquant.recipes.presets import PRESETS  # noqa: E402
from secquant.runtime.compressed import export_compressed_tensors  # noqa: E402
from tiny_causal_export import byte_batch, sentences, tiny_causal_lm  # noqa: E402

# The loaded model decompresses each layer to exactly secquant's (c - z) * s, so logits agree to float rounding.
ATOL = 1e-5


def _run(m, b):
    return m(**b).logits


def _quantized(family: str, recipe: Recipe):
    model = tiny_causal_lm(family)
    calib = [byte_batch(sentences()[100:116])]
    quantize_model(model, recipe, lambda: iter(calib), _run)
    return model


def _load_and_compare(model, out, tmp_path):
    from transformers import AutoModelForCausalLM

    batch = byte_batch(sentences()[:8])
    with torch.no_grad():
        ref = _run(model, batch)
        loaded = AutoModelForCausalLM.from_pretrained(out).eval()
        got = _run(loaded, batch)
    assert torch.allclose(got, ref, atol=ATOL), float((got - ref).abs().max())
    return loaded


W4_RTN_WIDTH = Recipe(name="w4a16-g64", weights=QuantArgs(bits=4, symmetric=False, granularity="group",
                                                         group_size=64, observer="mse"))


@pytest.mark.parametrize("family,recipe", [("llama", W4_RTN_WIDTH), ("qwen2", PRESETS["w8a16"])],
                         ids=["llama-w4a16-g64", "qwen2-w8a16"])
def test_transformers_loads_same_logits(tmp_path, family, recipe):
    model = _quantized(family, recipe)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer_config.json").write_text("{}")
    out = export_compressed_tensors(model, None, tmp_path / "ct", tokenizer_dir=tok)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["quantization_status"] == "compressed"
    schemes = list(q["config_groups"].values())
    bits = recipe.weights.bits
    assert {s["weights"]["num_bits"] for s in schemes} == {bits}
    assert {s["weights"]["strategy"] for s in schemes} == ({"group"} if bits == 4 else {"channel"})
    assert all(s["weights"]["symmetric"] == recipe.weights.symmetric for s in schemes)
    assert (out / "tokenizer_config.json").exists()
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        q_proj = "model.layers.0.self_attn.q_proj."
        if recipe.weights.symmetric:  # pack-quantized: codes packed densely into int32
            assert f.get_tensor(q_proj + "weight_packed").dtype == torch.int32
            assert q_proj + "weight_zero_point" not in keys
        else:  # naive-quantized: one code per int8, with zero points
            assert f.get_tensor(q_proj + "weight").dtype == torch.int8
            assert f.get_tensor(q_proj + "weight_zero_point").dtype == torch.int8
    assert q_proj + "weight_scale" in keys
    loaded = _load_and_compare(model, out, tmp_path)
    # the loaded model really is the quantized one: its weights lie on the integer grid, not the float model's
    w = loaded.model.layers[0].mlp.down_proj.weight.detach()
    ref_w = model.model.layers[0].mlp.down_proj.dequantized_weight()
    assert torch.equal(w, ref_w)
    assert not torch.allclose(w, tiny_causal_lm(family).model.layers[0].mlp.down_proj.weight, atol=1e-4)


def test_refuses_what_the_format_cannot_express(tmp_path):
    smoothed = _quantized("llama", PRESETS["w4a16"])  # AWQ-style scales
    with pytest.raises(SecquantError, match="smoothing"):
        export_compressed_tensors(smoothed, None, tmp_path / "a")
    nf4 = _quantized("llama", PRESETS["nf4"])
    with pytest.raises(SecquantError, match="codebook"):
        export_compressed_tensors(nf4, None, tmp_path / "b")
    dyn = _quantized("llama", PRESETS["w8a8-dynamic"])
    with pytest.raises(SecquantError, match="activations"):
        export_compressed_tensors(dyn, None, tmp_path / "c")
    gpt2 = _quantized("gpt2", PRESETS["w8a16"])
    with pytest.raises(SecquantError, match="Conv1D"):
        export_compressed_tensors(gpt2, None, tmp_path / "d")
    assert not any(tmp_path.iterdir())  # nothing written


def test_cli_compressed_tensors_bad_input(cli, assert_user_error, digits_artifact, tmp_path):
    art = digits_artifact("w8a16")
    assert_user_error(cli("export", art, "--format", "compressed-tensors"), contains=("--out",))
    assert_user_error(cli("export", art, "--format", "gguf"), contains=("compressed-tensors",))
    # a model that is not a Hugging Face transformers model has no config for the format
    assert_user_error(cli("export", art, "--format", "compressed-tensors", "--out", tmp_path / "ct"),
                      contains=("Hugging Face config",))
    assert not (tmp_path / "ct").exists()
    (tmp_path / "taken").mkdir()
    assert_user_error(cli("export", art, "--format", "compressed-tensors", "--out", tmp_path / "taken"),
                      contains=("already exists",))
