"""Quantized layers built from float layers: accuracy, buffers, serialization, rebuild."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from secquant.quant.modules import (
    QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, build_empty, qparam_shape, quantize_module,
)
from secquant.quant.primitives import packed_nbytes
from secquant.quant.schema import QuantArgs

BITS = [8, 6, 4, 3, 2]
# max |error| of the layer output relative to max |float output| (measured ~0.4% / 8% / 60%)
REL_TOL = {8: 0.015, 6: 0.06, 4: 0.2, 3: 0.4, 2: 1.2}


def wargs(bits=8, gran="channel", **kw):
    if gran == "group":
        kw.setdefault("group_size", 16)
    return QuantArgs(bits=bits, granularity=gran, **kw)


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    a, ref = a.detach(), ref.detach()
    return float((a - ref).abs().max() / ref.abs().max())


def make_cases(seed=0):
    """(name, float module, quantized class, source type, input) for each supported layer kind."""
    torch.manual_seed(seed)
    return [
        ("linear", nn.Linear(48, 24), QuantLinear, "Linear", torch.randn(10, 48)),
        ("linear-3d-input", nn.Linear(20, 12, bias=False), QuantLinear, "Linear", torch.randn(2, 5, 20)),
        ("hf-conv1d", Conv1D(24, 48), QuantLinear, "Conv1D", torch.randn(3, 7, 48)),
        ("conv1d", nn.Conv1d(6, 10, 3, stride=2, padding=1), QuantConv1d, "Conv1d", torch.randn(2, 6, 33)),
        ("conv2d", nn.Conv2d(4, 8, 3, padding=1, dilation=1), QuantConv2d, "Conv2d", torch.randn(2, 4, 12, 12)),
        ("conv2d-grouped", nn.Conv2d(6, 9, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=3),
         QuantConv2d, "Conv2d", torch.randn(2, 6, 11, 9)),
        ("conv2d-same", nn.Conv2d(3, 5, 3, padding="same"), QuantConv2d, "Conv2d", torch.randn(1, 3, 8, 8)),
    ]


CASE_IDS = [c[0] for c in make_cases()]


def _case(name):
    return next(c for c in make_cases() if c[0] == name)


def _quantize(mod, t, args, aargs=None):
    return quantize_module(mod, t, args, aargs)


# ---------------------------------------------------------------- accuracy

@pytest.mark.parametrize("name", CASE_IDS)
@pytest.mark.parametrize("gran", ["channel", "tensor", "group"])
def test_output_error_grows_as_bits_shrink(name, gran):
    _, mod, cls, t, x = _case(name)
    with torch.no_grad():
        ref = mod(x)
        errs = []
        for b in BITS:
            q = _quantize(mod, t, wargs(b, gran))
            assert isinstance(q, cls)
            out = q(x)
            assert out.shape == ref.shape
            errs.append(rel_err(out, ref))
    for b, e in zip(BITS, errs):
        assert e <= REL_TOL[b], (b, e)
    assert errs[0] < errs[2] < errs[4]  # 8 < 4 < 2 bits
    assert all(a <= b * 1.05 for a, b in zip(errs, errs[1:])), errs  # non-decreasing (5% slack)
    assert errs[0] > 0  # it is really quantized


@pytest.mark.parametrize("name", CASE_IDS)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("symmetric", "gran"), [(True, "channel"), (False, "channel"), (False, "group"), (True, "tensor")])
def test_dequantized_weight_within_half_step(name, bits, symmetric, gran):
    _, mod, _, t, _ = _case(name)
    args = wargs(bits, gran, symmetric=symmetric)
    q = _quantize(mod, t, args)
    w = mod.weight.detach()
    if t == "Conv1D":
        w = w.t()
    wq = q.dequantized_weight()
    assert wq.shape == w.shape
    w2, e2 = w.reshape(q.rows, -1), (wq - w).reshape(q.rows, -1)
    s = q.weight_scale
    if gran == "channel":
        s = s.reshape(-1, 1).expand_as(w2)
    elif gran == "group":
        s = s.repeat_interleave(args.group_size, dim=1)[:, : w2.shape[1]]
    else:
        s = s.expand_as(w2)
    assert bool((e2.abs() <= s / 2 * (1 + 1e-5) + 1e-7).all())


def test_hf_conv1d_matches_transposed_linear():
    torch.manual_seed(1)
    hf = Conv1D(16, 32)  # nf=16 outputs, nx=32 inputs: weight [32, 16]
    assert hf.weight.shape == (32, 16)
    q = QuantLinear.from_float(hf, wargs(8), None)
    assert (q.in_features, q.out_features) == (32, 16)
    assert q.dequantized_weight().shape == (16, 32)
    x = torch.randn(4, 32)
    with torch.no_grad():
        assert rel_err(q(x), hf(x)) < REL_TOL[8]
        lin = nn.Linear(32, 16)
        lin.weight.copy_(hf.weight.t())
        lin.bias.copy_(hf.bias)
        assert torch.equal(QuantLinear.from_float(lin, wargs(8), None)(x), q(x))


@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("gran", ["channel", "group"])
def test_embedding(bits, gran):
    torch.manual_seed(0)
    emb = nn.Embedding(30, 20, padding_idx=3)
    q = QuantEmbedding.from_float(emb, wargs(bits, gran, group_size=8) if gran == "group" else wargs(bits, gran))
    idx = torch.tensor([[0, 3, 29], [5, 5, 3]])
    out, ref = q(idx), emb(idx)
    assert out.shape == (2, 3, 20)
    assert rel_err(out, ref) <= REL_TOL[bits]
    assert torch.equal(out[0, 1], torch.zeros(20))  # padding row is zero, and 0 is exact
    assert q.padding_idx == 3


def test_embedding_rejects_max_norm_and_sparse():
    with pytest.raises(ValueError):
        QuantEmbedding.from_float(nn.Embedding(5, 4, max_norm=1.0), wargs())
    with pytest.raises(ValueError):
        QuantEmbedding.from_float(nn.Embedding(5, 4, sparse=True), wargs())


def test_conv_rejects_non_zero_padding_mode():
    with pytest.raises(ValueError):
        QuantConv2d.from_float(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), wargs(), None)


def test_bias_kept_in_float():
    lin = nn.Linear(8, 4)
    q = QuantLinear.from_float(lin, wargs(2), None)
    assert q.bias.dtype == torch.float32 and torch.equal(q.bias, lin.bias.detach())
    assert not q.bias.requires_grad


def test_mse_weight_observer_no_worse_than_minmax():
    torch.manual_seed(0)
    lin = nn.Linear(256, 16, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.distributions.StudentT(2.0).sample(lin.weight.shape))
    w = lin.weight.detach()
    errs = {}
    for obs in ["minmax", "mse"]:
        a = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=64, observer=obs)
        q = QuantLinear.from_float(lin, a, None)
        # squared error per (row, group): the granule the search optimizes
        errs[obs] = ((q.dequantized_weight() - w) ** 2).reshape(16, 4, 64).sum(-1)
    assert bool((errs["mse"] <= errs["minmax"] * (1 + 1e-5)).all())  # ratio 1 is a candidate
    assert float(errs["mse"].sum()) < 0.98 * float(errs["minmax"].sum())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name", ["linear", "hf-conv1d", "conv2d"])
def test_non_finite_weight_raises(name, bad):
    _, mod, _, t, _ = _case(name)
    with torch.no_grad():
        mod.weight.view(-1)[3] = bad
    with pytest.raises(ValueError):
        _quantize(mod, t, wargs(8))


def test_non_finite_embedding_raises():
    emb = nn.Embedding(4, 4)
    with torch.no_grad():
        emb.weight[1, 1] = float("nan")
    with pytest.raises(ValueError):
        QuantEmbedding.from_float(emb, wargs(8))


# ---------------------------------------------------------------- buffers

@pytest.mark.parametrize("name", CASE_IDS)
@pytest.mark.parametrize("bits", range(2, 9))
def test_qweight_is_exactly_packed(name, bits):
    _, mod, _, t, _ = _case(name)
    q = _quantize(mod, t, wargs(bits))
    rows = q.weight_shape[0]
    cols = math.prod(q.weight_shape[1:])
    assert q.qweight.dtype == torch.uint8 and q.qweight.ndim == 1
    assert q.qweight.numel() == packed_nbytes(rows * cols, bits) == math.ceil(rows * cols * bits / 8)
    codes = q.weight_codes()
    assert codes.shape == (rows, cols) and int(codes.max()) < 2**bits
    assert q.weight_zero_point.dtype == torch.uint8 and int(q.weight_zero_point.max()) < 2**bits
    assert q.weight_scale.dtype == torch.float32


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (QuantArgs(granularity="tensor"), ()),
        (QuantArgs(granularity="channel", axis=0), (24,)),
        (QuantArgs(granularity="channel", axis=1), (48,)),
        (QuantArgs(granularity="group", group_size=16), (24, 3)),
        (QuantArgs(granularity="group", group_size=20), (24, 3)),   # 48 = 20 + 20 + 8
        (QuantArgs(granularity="group", group_size=128), (24, 1)),  # group larger than the row
    ],
)
def test_qparam_shapes_per_granularity(args, expected):
    torch.manual_seed(0)
    lin = nn.Linear(48, 24)
    q = QuantLinear.from_float(lin, args, None)
    assert tuple(q.weight_scale.shape) == expected
    assert tuple(q.weight_zero_point.shape) == expected
    assert qparam_shape(args, 24, 48) == expected
    x = torch.randn(3, 48)
    with torch.no_grad():
        assert rel_err(q(x), lin(x)) < REL_TOL[8]


def test_conv_qparams_use_flattened_reduction_dim():
    conv = nn.Conv2d(4, 6, 3)  # rows 6, cols 4*3*3 = 36
    q = QuantConv2d.from_float(conv, wargs(4, "group", group_size=10), None)
    assert (q.rows, q.cols) == (6, 36)
    assert tuple(q.weight_scale.shape) == (6, 4)
    assert q.qweight.numel() == packed_nbytes(6 * 36, 4) == 108


def test_signed_codes_are_shifted_to_unsigned():
    lin = nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[-1.0, 1.0]]))
    q = QuantLinear.from_float(lin, QuantArgs(bits=8, symmetric=True, granularity="tensor"), None)
    # signed symmetric: -1 -> -127, 1 -> 127, zero point 0; stored shifted by +128
    assert q.weight_codes().tolist() == [[1, 255]]
    assert int(q.weight_zero_point) == 128
    assert q.dequantized_weight()[0].tolist() == pytest.approx([-1.0, 1.0], abs=1e-6)


def test_invalid_weight_granularity():
    with pytest.raises(ValueError):
        qparam_shape(QuantArgs(granularity="channel", axis=2), 4, 4)


# ---------------------------------------------------------------- state dict / rebuild

def _calibrated(q, x):
    if q.input_quant is not None and not q.input_quant.args.dynamic:
        q.input_quant.start_observing()
        q(x)
        q.input_quant.freeze()
    return q


AARGS = [
    None,
    QuantArgs(bits=8, symmetric=False, observer="minmax"),
    QuantArgs(bits=8, symmetric=False, granularity="token", dynamic=True),
]


@pytest.mark.parametrize("name", CASE_IDS)
@pytest.mark.parametrize("bits", [8, 3])
@pytest.mark.parametrize("aargs", AARGS, ids=["w-only", "a-static", "a-dynamic"])
def test_state_dict_safetensors_and_rebuild(name, bits, aargs, tmp_path):
    _, mod, _, t, x = _case(name)
    if aargs is not None and aargs.granularity == "token" and t in ("Conv1d", "Conv2d"):
        aargs = QuantArgs(bits=8, symmetric=False, granularity="tensor", dynamic=True)
    gran = "group" if bits == 3 else "channel"
    q = _calibrated(_quantize(mod, t, wargs(bits, gran), aargs), x)
    with torch.no_grad():
        out = q(x)
    sd = q.state_dict()
    assert sd and all(isinstance(v, torch.Tensor) for v in sd.values())
    assert "qweight" in sd and "weight" not in sd
    path = tmp_path / "layer.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    loaded = load_file(str(path))
    assert loaded.keys() == sd.keys()

    info = json.loads(json.dumps(q.layer_info(t)))  # the manifest entry is plain JSON
    assert info["source_type"] == t
    fresh = build_empty(info)
    assert type(fresh) is type(q)
    fresh.load_state_dict(loaded, strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), out)
    assert torch.equal(fresh.dequantized_weight(), q.dequantized_weight())


@pytest.mark.parametrize("bits", [8, 2])
def test_embedding_state_dict_and_rebuild(bits, tmp_path):
    torch.manual_seed(0)
    emb = nn.Embedding(17, 6, padding_idx=0)
    q = QuantEmbedding.from_float(emb, wargs(bits))
    sd = q.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in sd.values())
    save_file(sd, str(tmp_path / "e.safetensors"))
    fresh = build_empty(json.loads(json.dumps(q.layer_info("Embedding"))))
    fresh.load_state_dict(load_file(str(tmp_path / "e.safetensors")))
    idx = torch.arange(17)
    assert torch.equal(fresh(idx), q(idx))
    assert fresh.padding_idx == 0


def test_load_state_dict_invalidates_weight_cache():
    torch.manual_seed(0)
    a = QuantLinear.from_float(nn.Linear(8, 4), wargs(4), None)
    b = QuantLinear.from_float(nn.Linear(8, 4), wargs(4), None)
    x = torch.randn(2, 8)
    with torch.no_grad():
        b(x)  # fills b's dequantized-weight cache
        b.load_state_dict(a.state_dict())
        assert torch.equal(b(x), a(x))


def test_empty_layer_differs_until_loaded():
    torch.manual_seed(0)
    q = QuantLinear.from_float(nn.Linear(8, 4), wargs(8), None)
    fresh = build_empty(q.layer_info("Linear"))
    assert int(fresh.qweight.sum()) == 0
    assert not torch.equal(fresh.dequantized_weight(), q.dequantized_weight())


@pytest.mark.parametrize(
    "gran_kw",
    [dict(granularity="tensor"), dict(granularity="channel", axis=0), dict(granularity="channel", axis=1),
     dict(granularity="group", group_size=24)],
    ids=["tensor", "channel0", "channel1", "group24"],
)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_mse_weight_range_no_worse_per_granule(gran_kw, symmetric, bits):
    torch.manual_seed(3)
    lin = nn.Linear(40, 12, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.distributions.Laplace(0.0, 1.0).sample(lin.weight.shape))
    w = lin.weight.detach()

    def granule_err(obs):
        a = QuantArgs(bits=bits, symmetric=symmetric, observer=obs, **gran_kw)
        e = (QuantLinear.from_float(lin, a, None).dequantized_weight() - w) ** 2
        g = gran_kw["granularity"]
        if g == "tensor":
            return e.sum().reshape(1)
        if g == "channel":
            return e.sum(dim=1 if gran_kw["axis"] == 0 else 0)
        return torch.nn.functional.pad(e, (0, 8)).reshape(12, 2, 24).sum(-1)

    mse, mm = granule_err("mse"), granule_err("minmax")
    assert bool((mse <= mm * (1 + 1e-5) + 1e-9).all())
    assert float(mse.sum()) <= float(mm.sum())


def test_activation_only_layer_keeps_float_weight_and_rebuilds(tmp_path):
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    aargs = QuantArgs(bits=8, symmetric=False, granularity="token", dynamic=True)
    q = QuantLinear.from_float(lin, None, aargs)
    assert torch.equal(q.dequantized_weight(), lin.weight.detach())
    sd = q.state_dict()
    assert set(sd) == {"weight", "bias"}
    save_file(sd, str(tmp_path / "a.safetensors"))
    fresh = build_empty(json.loads(json.dumps(q.layer_info("Linear"))))
    fresh.load_state_dict(load_file(str(tmp_path / "a.safetensors")))
    x = torch.randn(3, 8)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))
        assert rel_err(q(x), lin(x)) < 0.02


def _outlier_linear(cols=256, rows=64, seed=0):
    """A Linear whose rows each carry a few large weights: what rotation is for."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(cols, rows)
    w = torch.randn(rows, cols, generator=g) * 0.02
    w[torch.arange(rows), torch.randint(0, cols, (rows,), generator=g)] = 1.0
    lin.weight.data.copy_(w)
    return lin


def test_rotated_linear_is_exact_in_float_and_rebuilds(tmp_path):
    from secquant.recipes import Rotation

    lin = _outlier_linear()
    x = torch.randn(32, 256)
    w4 = QuantArgs(bits=4, symmetric=False, granularity="group", group_size=128)
    plain = QuantLinear.from_float(lin, w4, None)
    rot = QuantLinear.from_float(lin, w4, None, rotation=Rotation(block=128))
    assert plain.rotation_block is None and rot.rotation_block == 128
    assert rot.config()["rotation"] == 128 and "rotation" not in plain.config()
    with torch.no_grad():
        ref = lin(x)
        err = {k: float((q(x) - ref).pow(2).mean()) for k, q in (("plain", plain), ("rot", rot))}
        # the stored weight is Q(W R); the float weight it stands for comes back unrotated
        torch.testing.assert_close(rot(x), x @ rot.float_weight().t() + lin.bias, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(rot.weight_space(lin.weight).reshape(-1).norm(), lin.weight.norm())
    assert err["rot"] < 0.5 * err["plain"], err  # outliers spread over their group: tighter ranges

    save_file({k: v.contiguous() for k, v in rot.state_dict().items()}, str(tmp_path / "r.safetensors"))
    fresh = build_empty(json.loads(json.dumps(rot.layer_info("Linear"))))
    fresh.load_state_dict(load_file(str(tmp_path / "r.safetensors")), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x), rot(x))


def test_rotation_skips_layers_it_does_not_fit():
    from secquant.recipes import Rotation

    q = QuantLinear.from_float(nn.Linear(96, 8), wargs(4, "group", group_size=32), None, rotation=Rotation(block=64))
    assert q.rotation_block is None and q.rotation_signs is None  # 64 does not divide 96: left unrotated
    with pytest.raises(ValueError, match="does not divide"):
        QuantLinear(96, 8, True, wargs(4), None, rotation=64)


def test_rotation_block_must_be_a_power_of_two():
    from pydantic import ValidationError

    from secquant.recipes import Rotation

    with pytest.raises(ValidationError, match="power of two"):
        Rotation(block=96)
