"""QuantMultiheadAttention matches nn.MultiheadAttention; unfused transformer layers never reach the fused kernel."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secquant.quant.modules import QuantLinear, QuantMultiheadAttention, restore_unfused, unfuse, unfused_modules
from secquant.quant.schema import QuantArgs, Recipe

CONFIGS = [{}, {"add_bias_kv": True}, {"add_zero_attn": True}, {"kdim": 5, "vdim": 7}, {"bias": False}]


def _inputs(batch_first: bool, kdim: int, vdim: int, N=3, L=4, S=6, E=8):
    g = torch.Generator().manual_seed(0)
    shape = (lambda n, s, e: (n, s, e)) if batch_first else (lambda n, s, e: (s, n, e))
    return (torch.randn(*shape(N, L, E), generator=g), torch.randn(*shape(N, S, kdim), generator=g),
            torch.randn(*shape(N, S, vdim), generator=g))


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("cfg", CONFIGS)
def test_split_attention_matches_pytorch(batch_first, cfg):
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(8, 2, batch_first=batch_first, **cfg).eval()
    got = QuantMultiheadAttention.from_float(ref).eval()
    q, k, v = _inputs(batch_first, cfg.get("kdim", 8), cfg.get("vdim", 8))
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[0, -2:] = True
    am = torch.randn(4, 6, generator=torch.Generator().manual_seed(1))
    cases = [{}, {"key_padding_mask": kpm}, {"attn_mask": am}, {"attn_mask": am > 1, "key_padding_mask": kpm},
             {"attn_mask": am.repeat(6, 1, 1)}, {"average_attn_weights": False}, {"need_weights": False}]
    with torch.no_grad():
        for kwargs in cases:
            want, got_ = ref(q, k, v, **kwargs), got(q, k, v, **kwargs)
            torch.testing.assert_close(got_[0], want[0], atol=1e-5, rtol=1e-5)
            if want[1] is None:
                assert got_[1] is None
            else:
                torch.testing.assert_close(got_[1], want[1], atol=1e-5, rtol=1e-5)


def test_unbatched_and_causal():
    ref = nn.MultiheadAttention(8, 2).eval()
    got = QuantMultiheadAttention.from_float(ref).eval()
    x = torch.randn(5, 8)
    causal = nn.Transformer.generate_square_subsequent_mask(5)
    with torch.no_grad():
        for kwargs in ({}, {"attn_mask": causal, "is_causal": True}):
            want, got_ = ref(x, x, x, **kwargs), got(x, x, x, **kwargs)
            torch.testing.assert_close(got_[0], want[0], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(got_[1], want[1], atol=1e-5, rtol=1e-5)
        # is_causal without a mask: the causal mask is built (PyTorch refuses the call)
        torch.testing.assert_close(got(x, x, x, is_causal=True)[0], ref(x, x, x, attn_mask=causal)[0],
                                   atol=1e-5, rtol=1e-5)


def test_dropout_only_in_training():
    got = QuantMultiheadAttention.from_float(nn.MultiheadAttention(8, 2, dropout=0.5))
    x = torch.randn(4, 2, 8)
    got.eval()
    assert torch.equal(got(x, x, x)[0], got(x, x, x)[0])
    got.train()
    torch.manual_seed(0)
    a = got(x, x, x)[0]
    assert not torch.allclose(a, got(x, x, x)[0])


def _encoder(norm_first: bool, activation: str) -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, dropout=0.0, batch_first=True, norm_first=norm_first,
                                       activation=activation)
    return nn.Sequential(nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)).eval()


def _quantize_layers(model: nn.Module) -> None:
    """Replace every Linear (the split projections included) by an 8-bit QuantLinear."""
    for name, m in list(model.named_modules()):
        if type(m) is nn.Linear:
            parent, _, child = name.rpartition(".")
            q = QuantLinear.from_float(m, QuantArgs(bits=8, granularity="channel"), None)
            setattr(model.get_submodule(parent), child, q)


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_unfused_encoder_never_calls_the_fused_kernel(norm_first, activation, monkeypatch):
    ref = _encoder(norm_first, activation)
    model = copy.deepcopy(ref)
    rec = unfuse(model)
    assert {n: e["type"] for n, e in rec.items()} == {
        "0": "TransformerEncoder", "0.layers.0": "TransformerEncoderLayer",
        "0.layers.0.self_attn": "MultiheadAttention", "0.layers.1": "TransformerEncoderLayer",
        "0.layers.1.self_attn": "MultiheadAttention"}
    assert rec["0.layers.0"]["config"] == {"norm_first": norm_first, "activation": activation}
    x = torch.randn(3, 7, 16)
    kpm = torch.zeros(3, 7, dtype=torch.bool)
    kpm[1, -3:] = True
    causal = nn.Transformer.generate_square_subsequent_mask(7)
    with torch.no_grad():  # eval + no_grad + batch_first + even heads: PyTorch's fused path conditions
        want = [ref[0](x), ref[0](x, src_key_padding_mask=kpm), ref[0](x, mask=causal, is_causal=True)]

    def fused(*args, **kwargs):
        raise AssertionError("the fused transformer kernel was called")

    monkeypatch.setattr(torch, "_transformer_encoder_layer_fwd", fused)
    with torch.no_grad():
        got = [model[0](x), model[0](x, src_key_padding_mask=kpm), model[0](x, mask=causal, is_causal=True)]
    for a, b in zip(got, want):
        keep = ~kpm[..., None]  # PyTorch's nested path zeroes padded positions
        torch.testing.assert_close(a * keep if a is got[1] else a, b * keep if a is got[1] else b, atol=1e-5, rtol=1e-4)
    _quantize_layers(model)
    with torch.no_grad():
        q = model[0](x, src_key_padding_mask=kpm)
    assert torch.isfinite(q[~kpm]).all()
    assert torch.nn.functional.cosine_similarity(q[~kpm], want[1][~kpm], dim=-1).min() > 0.99


def test_restore_replays_the_record_and_refuses_mismatches():
    model = _encoder(False, "relu")
    rec = unfuse(copy.deepcopy(model))
    fresh = copy.deepcopy(model)
    restore_unfused(fresh, rec)
    assert unfused_modules(fresh) == rec
    with pytest.raises(ValueError, match="does not match"):
        bad = copy.deepcopy(rec)
        bad["0.layers.0.self_attn"]["config"]["num_heads"] = 2
        restore_unfused(copy.deepcopy(model), bad)
    with pytest.raises(ValueError, match="is a Linear"):
        restore_unfused(nn.Sequential(nn.Linear(2, 2)), {"0": rec["0.layers.0.self_attn"]})
    with pytest.raises(ValueError, match="does not exist"):
        restore_unfused(copy.deepcopy(model), {"9": rec["0"]})


def test_plan_leaves_an_ignored_attention_whole():
    from secquant.quant.algorithms import apply_recipe
    from secquant.quant.algorithms.rtn import unfuse_attention

    model = _encoder(False, "relu")
    recipe = Recipe(weights=QuantArgs(bits=8, granularity="channel"), ignore=["0.layers.0.self_attn"])
    unfuse_attention(model, recipe)
    layers = apply_recipe(model, recipe)
    assert isinstance(model.get_submodule("0.layers.0.self_attn"), nn.MultiheadAttention)
    assert type(model.get_submodule("0.layers.0.self_attn.out_proj")) is not QuantLinear  # read by PyTorch itself
    assert "0.layers.1.self_attn.q_proj" in layers and not any(n.startswith("0.layers.0.self_attn") for n in layers)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(2, 5, 16))).all()


def test_full_transformer_runs_split_and_quantized():
    torch.manual_seed(0)
    ref = nn.Transformer(16, 2, 1, 1, 32, dropout=0.0, batch_first=True).eval()
    model = copy.deepcopy(ref)
    unfuse(model)
    src, tgt = torch.randn(2, 6, 16), torch.randn(2, 3, 16)
    mask = nn.Transformer.generate_square_subsequent_mask(3)
    with torch.no_grad():
        want = ref(src, tgt, tgt_mask=mask, tgt_is_causal=True)
        torch.testing.assert_close(model(src, tgt, tgt_mask=mask, tgt_is_causal=True), want, atol=1e-5, rtol=1e-4)
        _quantize_layers(model)
        got = model(src, tgt, tgt_mask=mask, tgt_is_causal=True)
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1)).min() > 0.99
