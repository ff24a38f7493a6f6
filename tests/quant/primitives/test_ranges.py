"""qrange and choose_qparams: integer ranges and the qparams chosen from observed ranges."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from secquant.quant.primitives import choose_qparams, dequantize, quantize, qrange

PROP = settings(max_examples=80, deadline=None)

finite = st.floats(min_value=-1e6, max_value=1e6, allow_nan=False, allow_infinity=False, width=32)


@pytest.mark.parametrize(
    ("bits", "signed", "expected"),
    [
        (8, True, (-128, 127)),
        (8, False, (0, 255)),
        (4, True, (-8, 7)),
        (4, False, (0, 15)),
        (3, True, (-4, 3)),
        (3, False, (0, 7)),
        (2, True, (-2, 1)),
        (2, False, (0, 3)),
        (1, False, (0, 1)),
        (16, True, (-32768, 32767)),
    ],
)
def test_qrange_values(bits, signed, expected):
    assert qrange(bits, signed) == expected


@pytest.mark.parametrize("bits", [0, -1, 17])
def test_qrange_rejects_bad_bits(bits):
    with pytest.raises(ValueError):
        qrange(bits, True)


@PROP
@given(a=finite, b=finite, bits=st.integers(2, 8), signed=st.booleans(), symmetric=st.booleans())
def test_choose_qparams_represents_zero_exactly(a, b, bits, signed, symmetric):
    lo, hi = min(a, b), max(a, b)
    scale, zp = choose_qparams(torch.tensor(lo), torch.tensor(hi), bits, signed, symmetric)
    qmin, qmax = qrange(bits, signed)
    assert float(scale) > 0
    assert zp.dtype == torch.int32
    assert qmin <= int(zp) <= qmax
    q0 = quantize(torch.zeros(3), scale, zp, bits, signed)
    assert torch.equal(q0, zp.expand(3).to(torch.int32))  # 0 maps to the zero point, unclamped
    assert torch.equal(dequantize(q0, scale, zp), torch.zeros(3))


@PROP
@given(a=finite, b=finite, bits=st.integers(2, 8), signed=st.booleans(), symmetric=st.booleans())
def test_choose_qparams_grid_covers_observed_range(a, b, bits, signed, symmetric):
    """The representable interval [(qmin-z)s, (qmax-z)s] holds [lo, hi] up to half a step."""
    lo, hi = min(a, b), max(a, b)
    scale, zp = choose_qparams(torch.tensor(lo), torch.tensor(hi), bits, signed, symmetric)
    qmin, qmax = qrange(bits, signed)
    s, z = float(scale), int(zp)
    tol = s / 2 + 1e-5 * max(abs(lo), abs(hi), 1e-30)
    assert (qmin - z) * s <= min(lo, 0.0) + tol
    assert (qmax - z) * s >= max(hi, 0.0) - tol


def test_choose_qparams_known_values():
    # asymmetric unsigned 8-bit on [-1, 3]: scale 4/255, zero point round(255/4) = 64
    s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(3.0), 8, False, False)
    assert float(s) == pytest.approx(4 / 255, rel=1e-6)
    assert int(z) == 64
    # symmetric signed 8-bit: scale = max|x| / 127, zero point 0
    s, z = choose_qparams(torch.tensor(-2.0), torch.tensor(1.0), 8, True, True)
    assert float(s) == pytest.approx(2 / 127, rel=1e-6)
    assert int(z) == 0
    # symmetric unsigned 4-bit: zero point mid-grid (8), scale max|x| / 7
    s, z = choose_qparams(torch.tensor(-0.5), torch.tensor(3.5), 4, False, True)
    assert float(s) == pytest.approx(0.5, rel=1e-6)
    assert int(z) == 8
    # a positive-only range is widened to hold 0
    s, z = choose_qparams(torch.tensor(2.0), torch.tensor(4.0), 8, False, False)
    assert float(s) == pytest.approx(4 / 255, rel=1e-6)
    assert int(z) == 0


def test_choose_qparams_degenerate_all_zero_range():
    s, z = choose_qparams(torch.tensor(0.0), torch.tensor(0.0), 8, True, False)
    assert float(s) > 0 and torch.isfinite(s)
    x = torch.zeros(4)
    assert torch.equal(dequantize(quantize(x, s, z, 8, True), s, z), x)


def test_choose_qparams_vectorised_per_channel():
    lo = torch.tensor([-1.0, 0.0, -4.0])
    hi = torch.tensor([1.0, 2.0, 0.0])
    s, z = choose_qparams(lo, hi, 8, True, True)
    assert s.shape == (3,) and z.shape == (3,)
    torch.testing.assert_close(s, torch.tensor([1 / 127, 2 / 127, 4 / 127]))
    assert torch.equal(z, torch.zeros(3, dtype=torch.int32))
