"""Saturating affine quantization: round trips, saturation, granularities."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secquant.quant.primitives import (
    PerChannel, PerGroup, PerTensor, PerToken, choose_qparams, dequantize, fake_quantize,
    group_view, quantize, quantize_tensor, qrange, reduce_range, ungroup_view,
)

PROP = settings(max_examples=60, deadline=None)


def element_scale(scale: torch.Tensor, x: torch.Tensor, gran) -> torch.Tensor:
    """Independent broadcast of a compact qparam to x's shape (the oracle for the bounds)."""
    if isinstance(gran, PerTensor):
        return scale.expand_as(x)
    if isinstance(gran, PerToken):
        return scale.expand_as(x)
    if isinstance(gran, PerChannel):
        axis = gran.axis % x.ndim
        shape = [1] * x.ndim
        shape[axis] = x.shape[axis]
        return scale.reshape(shape).expand_as(x)
    axis = gran.axis % x.ndim
    n = x.shape[axis]
    idx = torch.arange(n) // gran.group_size
    per_elem = scale[..., idx]  # (..., n) with the grouped axis last
    return per_elem.movedim(-1, axis)


def assert_round_trip(x, bits, signed, symmetric, gran):
    q, s, z = quantize_tensor(x, bits, signed, symmetric, gran)
    qmin, qmax = qrange(bits, signed)
    assert q.dtype == torch.int32 and q.shape == x.shape
    assert int(q.min()) >= qmin and int(q.max()) <= qmax
    xhat = dequantize(q, s, z, gran)
    assert xhat.shape == x.shape and xhat.dtype == torch.float32
    bound = element_scale(s, x, gran) / 2
    tol = 1e-5 * bound + 1e-6 * x.abs().amax().clamp_min(1e-30)
    err = (xhat - x).abs()
    assert bool((err <= bound + tol).all()), float((err - bound).max())
    # fake_quantize is quantize followed by dequantize
    torch.testing.assert_close(fake_quantize(x, s, z, bits, signed, gran), xhat, rtol=0, atol=float(tol.max()))
    return q, s, z


def _tensor(seed: int, shape, magnitude: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * magnitude


common = dict(
    seed=st.integers(0, 2**31 - 1),
    bits=st.integers(2, 8),
    signed=st.booleans(),
    symmetric=st.booleans(),
    magnitude=st.sampled_from([1e-3, 1.0, 37.5, 1e4]),
)


@PROP
@given(shape=st.lists(st.integers(1, 9), min_size=1, max_size=4), **common)
def test_round_trip_per_tensor(seed, shape, bits, signed, symmetric, magnitude):
    x = _tensor(seed, shape, magnitude)
    _, s, z = assert_round_trip(x, bits, signed, symmetric, PerTensor())
    assert s.shape == () and z.shape == ()


@PROP
@given(data=st.data(), shape=st.lists(st.integers(1, 7), min_size=2, max_size=4), **common)
def test_round_trip_per_channel_any_axis(data, seed, shape, bits, signed, symmetric, magnitude):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = _tensor(seed, shape, magnitude)
    _, s, z = assert_round_trip(x, bits, signed, symmetric, PerChannel(axis))
    assert s.shape == (shape[axis],) and z.shape == (shape[axis],)


@pytest.mark.parametrize(
    ("shape", "axis"),
    [((6, 5), 0), ((6, 5), 1), ((3, 4, 5), 1), ((3, 4, 5), -1), ((2, 3, 4, 5), 2), ((2, 3, 4, 5), 0)],
)
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("signed", "symmetric"), [(True, True), (False, False), (True, False), (False, True)])
def test_round_trip_per_channel_cases(shape, axis, bits, signed, symmetric):
    x = _tensor(1, shape, 3.0)
    _, s, _ = assert_round_trip(x, bits, signed, symmetric, PerChannel(axis))
    # each channel's scale comes from that channel's own range
    flat = x.movedim(axis, 0).reshape(shape[axis], -1)
    lo, hi = flat.amin(1).clamp(max=0), flat.amax(1).clamp(min=0)
    qmin, qmax = qrange(bits, signed)
    width = torch.maximum(-lo, hi) / ((qmax - qmin) // 2) if symmetric else (hi - lo) / (qmax - qmin)
    torch.testing.assert_close(s, width)


@PROP
@given(
    data=st.data(),
    shape=st.lists(st.integers(1, 13), min_size=1, max_size=3),
    group_size=st.integers(1, 20),
    **common,
)
def test_round_trip_per_group(data, seed, shape, group_size, bits, signed, symmetric, magnitude):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1), label="axis")
    x = _tensor(seed, shape, magnitude)
    gran = PerGroup(group_size, axis)
    _, s, z = assert_round_trip(x, bits, signed, symmetric, gran)
    moved = list(x.movedim(axis, -1).shape)
    assert s.shape == (*moved[:-1], math.ceil(shape[axis] / group_size))
    assert z.shape == s.shape


@pytest.mark.parametrize(
    ("n", "group_size"),
    [(12, 4), (12, 12), (10, 4), (10, 3), (7, 2), (5, 8), (5, 128), (1, 4)],
    ids=["divides", "one-group", "partial-4", "partial-3", "partial-2", "group>dim", "group>>dim", "single"],
)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("signed", "symmetric"), [(True, True), (False, False), (False, True)])
def test_round_trip_per_group_cases(n, group_size, bits, signed, symmetric):
    x = _tensor(2, (3, n), 2.0)
    gran = PerGroup(group_size, -1)
    _, s, _ = assert_round_trip(x, bits, signed, symmetric, gran)
    n_groups = math.ceil(n / group_size)
    assert s.shape == (3, n_groups)
    # every group's scale comes from its own elements only (padding never widens it)
    for r in range(3):
        for g in range(n_groups):
            chunk = x[r, g * group_size:(g + 1) * group_size]
            es, _ = choose_qparams(chunk.min(), chunk.max(), bits, signed, symmetric)
            assert float(s[r, g]) == pytest.approx(float(es), rel=1e-6)


def test_per_group_scale_isolated_from_outlier_in_other_group():
    x = torch.tensor([[0.1, -0.2, 0.05, 0.1, 100.0, 1.0]])
    q, s, z = quantize_tensor(x, 4, True, True, PerGroup(4, -1))
    assert float(s[0, 0]) == pytest.approx(0.2 / 7, rel=1e-6)
    assert float(s[0, 1]) == pytest.approx(100.0 / 7, rel=1e-6)
    # the first group keeps fine resolution despite the outlier two positions later
    assert float((dequantize(q, s, z, PerGroup(4, -1))[0, :4] - x[0, :4]).abs().max()) <= 0.2 / 14 + 1e-7


@PROP
@given(
    seed=st.integers(0, 2**31 - 1),
    rows=st.integers(1, 6),
    cols=st.integers(1, 12),
    bits=st.integers(2, 8),
    signed=st.booleans(),
    symmetric=st.booleans(),
)
def test_round_trip_per_token(seed, rows, cols, bits, signed, symmetric):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=g) * torch.logspace(-2, 2, rows).unsqueeze(1)
    _, s, z = assert_round_trip(x, bits, signed, symmetric, PerToken())
    assert s.shape == (rows, 1)


@PROP
@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    zp_frac=st.floats(0, 1),
    scale=st.floats(1e-4, 1e3),
    u=st.lists(st.floats(0, 1), min_size=1, max_size=20),
)
def test_round_trip_explicit_qparams_inside_range(bits, signed, zp_frac, scale, u):
    """Any x in [(qmin-z)s, (qmax-z)s] comes back within s/2."""
    qmin, qmax = qrange(bits, signed)
    z = qmin + round(zp_frac * (qmax - qmin))
    s = torch.tensor(scale, dtype=torch.float32)
    lo, hi = (qmin - z) * float(s), (qmax - z) * float(s)
    x = torch.tensor([lo + t * (hi - lo) for t in u], dtype=torch.float32).clamp(lo, hi)
    zt = torch.tensor(z, dtype=torch.int32)
    xhat = dequantize(quantize(x, s, zt, bits, signed), s, zt)
    tol = float(s) / 2 * (1 + 1e-5) + 1e-6 * max(abs(lo), abs(hi))
    assert float((xhat - x).abs().max()) <= tol


@pytest.mark.parametrize("bits", range(2, 9))
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("symmetric", [True, False])
def test_saturation_maps_far_values_to_qmin_qmax(bits, signed, symmetric):
    qmin, qmax = qrange(bits, signed)
    s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(1.0), bits, signed, symmetric)
    x = torch.tensor([-1e30, -1e6, -50.0, 50.0, 1e6, 1e30])
    q = quantize(x, s, z, bits, signed)
    assert q.tolist() == [qmin] * 3 + [qmax] * 3
    fq = fake_quantize(x, s, z, bits, signed)
    assert fq[:3].tolist() == [float((qmin - z) * s)] * 3
    assert fq[3:].tolist() == [float((qmax - z) * s)] * 3


def test_saturation_per_channel_and_group():
    s = torch.tensor([0.1, 1.0])
    z = torch.tensor([0, 3], dtype=torch.int32)
    x = torch.tensor([[1e5, -1e5], [1e5, -1e5]])
    assert quantize(x, s, z, 4, True, PerChannel(0)).tolist() == [[7, -8], [7, -8]]
    sg = torch.tensor([[0.1], [0.2]])
    zg = torch.zeros(2, 1, dtype=torch.int32)
    assert quantize(x, sg, zg, 3, False, PerGroup(4, -1)).tolist() == [[7, 0], [7, 0]]


def test_round_half_to_even_at_ties():
    s = torch.tensor(1.0)
    z = torch.tensor(0, dtype=torch.int32)
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5])
    assert quantize(x, s, z, 8, True).tolist() == [0, 2, 2, 0, -2]


def test_quantize_known_codes():
    x = torch.tensor([-1.0, 0.0, 1.0, 3.0])
    q, s, z = quantize_tensor(x, 8, False, False)
    assert int(z) == 64
    assert q.tolist() == [0, 64, 128, 255]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fake_quantize_keeps_dtype(dtype):
    x = torch.linspace(-1, 1, 17, dtype=dtype)
    s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(1.0), 8, True, True)
    fq = fake_quantize(x, s, z, 8, True)
    assert fq.dtype == dtype
    assert float((fq.float() - x.float()).abs().max()) <= float(s) / 2 + 1e-2


@PROP
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    group_size=st.integers(1, 12),
    data=st.data(),
)
def test_group_view_ungroup_view_inverse(shape, group_size, data):
    axis = data.draw(st.integers(-len(shape), len(shape) - 1))
    x = torch.arange(math.prod(shape), dtype=torch.float32).reshape(shape) + 1
    xg = group_view(x, group_size, axis)
    n = shape[axis]
    assert xg.shape[-1] == group_size and xg.shape[-2] == math.ceil(n / group_size)
    assert int((xg == 0).sum()) == xg.numel() - x.numel()  # only zero padding added
    assert torch.equal(ungroup_view(xg, n, axis, x.ndim), x)


def test_reduce_range_per_granularity():
    x = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, 0.5]])
    lo, hi = reduce_range(x, PerTensor())
    assert (float(lo), float(hi)) == (-4.0, 5.0)
    lo, hi = reduce_range(x, PerChannel(0))
    assert lo.tolist() == [-2.0, -4.0] and hi.tolist() == [3.0, 5.0]
    lo, hi = reduce_range(x, PerChannel(1))
    assert lo.tolist() == [-4.0, -2.0, 0.5] and hi.tolist() == [1.0, 5.0, 3.0]
    lo, hi = reduce_range(x, PerToken())
    assert lo.tolist() == [[-2.0], [-4.0]] and hi.tolist() == [[3.0], [5.0]]


@pytest.mark.parametrize("axis", [2, -3])
def test_bad_axis_raises(axis):
    with pytest.raises(ValueError):
        quantize_tensor(torch.ones(2, 3), 8, True, True, PerChannel(axis))


def test_group_size_must_be_positive():
    with pytest.raises(ValueError):
        PerGroup(0)
