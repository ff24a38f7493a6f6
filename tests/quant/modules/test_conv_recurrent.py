"""Quantized Conv3d, transposed and grouped/depthwise convolutions, LSTM and GRU: accuracy, layouts, rebuild."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from secquant.quant.modules import (
    QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d, QuantGRU, QuantLSTM, build_empty, float_layer_type,
    quantize_module,
)
from secquant.quant.modules.conv import to_conv_layout, to_transposed_layout
from secquant.quant.schema import QuantArgs

W8 = QuantArgs(bits=8, granularity="channel")
W4G = QuantArgs(bits=4, granularity="group", group_size=16, symmetric=False)
DYN = QuantArgs(bits=8, symmetric=False, granularity="token", dynamic=True)


def _rel(a, b) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


CONVS = [
    ("convT1d", lambda: nn.ConvTranspose1d(6, 4, 3, stride=2, padding=1, output_padding=1), QuantConvTranspose1d,
     (3, 6, 9)),
    ("convT2d-grouped", lambda: nn.ConvTranspose2d(8, 6, 3, stride=2, padding=1, groups=2, bias=False),
     QuantConvTranspose2d, (2, 8, 5, 5)),
    ("conv3d", lambda: nn.Conv3d(3, 5, (2, 3, 3), padding=(0, 1, 1)), QuantConv3d, (2, 3, 4, 6, 6)),
    ("depthwise", lambda: nn.Conv2d(8, 8, 3, padding=1, groups=8), None, (2, 8, 6, 6)),
    ("grouped1d", lambda: nn.Conv1d(8, 12, 3, groups=4), None, (2, 8, 10)),
]


@pytest.mark.parametrize("name,make,cls,shape", CONVS, ids=[c[0] for c in CONVS])
@pytest.mark.parametrize("wargs,tol", [(W8, 0.02), (W4G, 0.25)], ids=["w8", "w4g16"])
def test_convolutions_quantize_and_rebuild(name, make, cls, shape, wargs, tol):
    torch.manual_seed(0)
    f, x = make().eval(), torch.randn(*shape)
    t = float_layer_type(f)
    q = quantize_module(f, t, wargs, DYN)
    assert cls is None or isinstance(q, cls)
    with torch.no_grad():
        ref, out = f(x), q(x)
    assert out.shape == ref.shape and 0 < _rel(out, ref) < tol
    empty = build_empty(q.layer_info(t))
    empty.load_state_dict(q.state_dict())
    assert torch.equal(empty(x), out)


def test_transposed_weight_is_stored_per_output_channel():
    torch.manual_seed(0)
    f = nn.ConvTranspose2d(8, 6, 3, groups=2)  # torch weight [in=8, out/g=3, 3, 3]
    w = f.weight.detach()
    assert torch.equal(to_transposed_layout(to_conv_layout(w, 2), 2), w)
    q = quantize_module(f, "ConvTranspose2d", W8, None)
    assert q.weight_shape == (6, 4, 3, 3) and q.weight_scale.shape == (6,)  # one scale per output channel
    # output channel 4 (group 1) scaled by 10: only its own scale changes
    g = copy.deepcopy(f)
    with torch.no_grad():
        g.weight[4:, 1] *= 10
    q2 = quantize_module(g, "ConvTranspose2d", W8, None)
    changed = (q2.weight_scale != q.weight_scale).nonzero().flatten().tolist()
    assert changed == [4]


def _float_copy(f: nn.RNNBase, q) -> nn.RNNBase:
    """`f` with the quantized layer's dequantized weights: the recurrence must then match torch's exactly."""
    g = copy.deepcopy(f)
    sd = {k: (getattr(q, k).dequantized_weight() if k.startswith("weight") else getattr(q, k))
          for k in g.state_dict()}
    g.load_state_dict(sd)
    return g


RNNS = [
    ("lstm-2layer-bi-batchfirst", lambda: nn.LSTM(5, 12, num_layers=2, batch_first=True, bidirectional=True),
     (3, 7, 5)),
    ("gru-2layer-bi", lambda: nn.GRU(5, 12, num_layers=2, bidirectional=True), (7, 3, 5)),
    ("lstm-nobias-unbatched", lambda: nn.LSTM(5, 12, bias=False), (7, 5)),
    ("gru-batchfirst", lambda: nn.GRU(5, 12, batch_first=True), (3, 7, 5)),
]


@pytest.mark.parametrize("name,make,shape", RNNS, ids=[r[0] for r in RNNS])
def test_recurrent_layers_run_torch_s_recurrence_on_quantized_weights(name, make, shape):
    torch.manual_seed(0)
    f, x = make().eval(), torch.randn(*shape)
    t = float_layer_type(f)
    q = quantize_module(f, t, W8, None)
    assert isinstance(q, QuantLSTM if t == "LSTM" else QuantGRU)
    with torch.no_grad():
        out, h = q(x)
        ref, href = _float_copy(f, q)(x)
        assert torch.allclose(out, ref, atol=1e-5) and out.shape == f(x)[0].shape
        for a, b in zip(h if isinstance(h, tuple) else (h,), href if isinstance(href, tuple) else (href,)):
            assert torch.allclose(a, b, atol=1e-5)
        assert 0 < _rel(out, f(x)[0]) < 0.02
        # initial states are used
        n = f.num_layers * (2 if f.bidirectional else 1)
        batch = () if len(shape) == 2 else (shape[0] if f.batch_first else shape[1],)
        h0 = torch.randn(n, *batch, f.hidden_size)
        hx = (h0, torch.randn_like(h0)) if t == "LSTM" else h0
        assert torch.allclose(q(x, hx)[0], _float_copy(f, q)(x, hx)[0], atol=1e-5)
        # dynamic int8 activations: the inputs and the hidden state fed back are quantized at every step
        qd = quantize_module(f, t, W8, DYN)
        dyn = qd(x)[0]
        assert not torch.equal(dyn, out) and _rel(dyn, f(x)[0]) < 0.03
    empty = build_empty(qd.layer_info(t))
    empty.load_state_dict(qd.state_dict())
    assert torch.equal(empty(x)[0], dyn)


def test_recurrent_static_activations_calibrate():
    from secquant.quant.algorithms import calibrate

    torch.manual_seed(0)
    f = nn.LSTM(5, 8, num_layers=2)
    static = QuantArgs(bits=8, symmetric=False)
    m = nn.Sequential(quantize_module(f, "LSTM", W8, static))
    x = torch.randn(6, 4, 5)
    assert calibrate(m, [x], lambda mod, b: mod(b)) == 1
    assert _rel(m[0](x)[0], f(x)[0]) < 0.05


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU])
@pytest.mark.parametrize("sorted_", [True, False])
def test_packed_sequences_stop_at_their_own_length(cell, sorted_):
    torch.manual_seed(0)
    f = cell(5, 8, num_layers=2, bidirectional=True, batch_first=True).eval()
    q = quantize_module(f, cell.__name__, W8, None)
    g = _float_copy(f, q)
    x = torch.randn(4, 7, 5)
    lengths = [7, 5, 3, 2] if sorted_ else [3, 7, 2, 5]
    packed = nn.utils.rnn.pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=sorted_)
    with torch.no_grad():
        out, h = q(packed)
        ref, href = g(packed)
    assert isinstance(out, nn.utils.rnn.PackedSequence) and torch.equal(out.batch_sizes, ref.batch_sizes)
    assert torch.allclose(out.data, ref.data, atol=1e-5)
    for a, b in zip(h if isinstance(h, tuple) else (h,), href if isinstance(href, tuple) else (href,)):
        assert torch.allclose(a, b, atol=1e-5)
    with torch.no_grad():  # the lengths matter: a plain run over the padded batch reads the padding
        padded_run = q(x)[0]
    assert not torch.allclose(nn.utils.rnn.pad_packed_sequence(out, batch_first=True)[0], padded_run, atol=1e-3)


def test_the_integrity_guard_covers_every_recurrent_tensor():
    from secquant.security.integrity import IntegrityGuard, reachable_tensors

    m = nn.Sequential(quantize_module(nn.GRU(4, 6, bidirectional=True), "GRU", W4G, DYN))
    m[0](torch.randn(3, 2, 4))
    g = IntegrityGuard(m, b"k")
    assert set(g.tensors) == set(reachable_tensors(m))
    assert {"0.weight_ih_l0_reverse.qweight", "0.bias_hh_l0", "0.weight_hh_l0._w_cache"} <= set(g.tensors)
    assert set(g.layers) == {f"0.weight_{k}_l0{s}" for k in ("ih", "hh") for s in ("", "_reverse")}
    m[0].weight_hh_l0.qweight[0] ^= 0x10
    assert [c.name for c in g.check()] == ["0.weight_hh_l0.qweight"]
