"""ActQuant: static (observe, then freeze) and dynamic (per-token / per-tensor) activation quantizers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secquant.quant.modules import ActQuant, QuantLinear, make_observer
from secquant.quant.observers import (
    MinMaxObserver, MovingAverageMinMaxObserver, MSEObserver, PercentileObserver,
)
from secquant.quant.primitives import qrange, quantize
from secquant.quant.schema import QuantArgs

STATIC_U8 = QuantArgs(bits=8, symmetric=False, observer="minmax")


def test_static_before_calibration_raises():
    aq = ActQuant(STATIC_U8)
    with pytest.raises(RuntimeError):
        aq(torch.randn(3))
    # a layer carrying it refuses too
    q = QuantLinear.from_float(nn.Linear(4, 2), QuantArgs(), STATIC_U8)
    with pytest.raises(RuntimeError):
        q(torch.randn(1, 4))


def test_observing_passes_values_through_unchanged():
    aq = ActQuant(STATIC_U8)
    aq.start_observing()
    x = torch.randn(5, 7)
    assert torch.equal(aq(x), x)
    assert aq.observer.count == 1


@pytest.mark.parametrize(
    ("args", "lo", "hi"),
    [
        (QuantArgs(bits=8, symmetric=False), -1.0, 3.0),
        (QuantArgs(bits=8, symmetric=True), -2.0, 1.0),
        (QuantArgs(bits=4, symmetric=False), -0.5, 7.0),
        (QuantArgs(bits=4, symmetric=False, signed=True), -3.0, 1.5),
        (QuantArgs(bits=2, symmetric=True), -1.0, 1.0),
    ],
)
def test_observe_then_freeze_maps_range_onto_int_range(args, lo, hi):
    aq = ActQuant(args)
    aq.start_observing()
    aq(torch.tensor([lo, 0.3 * lo, 0.0]))
    aq(torch.tensor([0.1 * hi, hi]))
    aq.freeze()
    assert aq.calibrated and aq.observer is None
    s, z = aq.scale, aq.zero_point
    qmin, qmax = qrange(args.bits, args.is_signed)
    ends = quantize(torch.tensor([lo, hi]), s, z, args.bits, args.is_signed).tolist()
    if args.symmetric:
        # the larger |end| lands on the symmetric grid's edge: +-(qmax - qmin) // 2 around z
        half = (qmax - qmin) // 2
        assert float(s) == pytest.approx(max(-lo, hi) / half, rel=1e-6)
        big = ends[0] if -lo >= hi else ends[1]
        assert abs(big - int(z)) == half
    else:
        assert float(s) == pytest.approx((hi - lo) / (qmax - qmin), rel=1e-6)
        assert ends == [qmin, qmax]
    # inside the calibrated range: error <= scale/2; outside: clamped to the range's ends
    x = torch.linspace(lo, hi, 101)
    y = aq(x)
    assert float((y - x).abs().max()) <= float(s) / 2 * (1 + 1e-5) + 1e-6
    far = aq(torch.tensor([lo - 100.0, hi + 100.0]))
    assert far.tolist() == pytest.approx([(qmin - int(z)) * float(s), (qmax - int(z)) * float(s)])


def test_freeze_uses_the_configured_observer():
    args = QuantArgs(bits=8, symmetric=False, observer="percentile", percentile=99.0)
    aq = ActQuant(args)
    aq.start_observing()
    assert isinstance(aq.observer, PercentileObserver) and aq.observer.percentile == 99.0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=g)
    x[0] = 1000.0
    aq(x)
    aq.freeze()
    # the clipped range is ~[-2.33, 2.33], not [.., 1000]
    assert float(aq.scale) == pytest.approx(4.65 / 255, rel=0.1)


@pytest.mark.parametrize(
    ("args", "cls"),
    [
        (QuantArgs(observer="minmax"), MinMaxObserver),
        (QuantArgs(observer="moving_average"), MovingAverageMinMaxObserver),
        (QuantArgs(observer="percentile", percentile=99.5), PercentileObserver),
        (QuantArgs(bits=4, symmetric=False, observer="mse"), MSEObserver),
    ],
)
def test_make_observer(args, cls):
    obs = make_observer(args)
    assert type(obs) is cls
    if cls is PercentileObserver:
        assert obs.percentile == 99.5
    if cls is MSEObserver:
        assert (obs.bits, obs.signed, obs.symmetric) == (4, False, False)


def test_freeze_without_observing_is_a_no_op():
    aq = ActQuant(STATIC_U8)
    aq.freeze()
    assert not aq.calibrated
    assert float(aq.scale) == 1.0


def test_freeze_after_no_data_raises():
    aq = ActQuant(STATIC_U8)
    aq.start_observing()
    with pytest.raises(RuntimeError):
        aq.freeze()


def test_static_buffers_in_state_dict_and_load_marks_calibrated():
    a = ActQuant(STATIC_U8)
    a.start_observing()
    a(torch.tensor([-1.0, 3.0]))
    a.freeze()
    sd = a.state_dict()
    assert set(sd) == {"scale", "zero_point"}
    assert sd["zero_point"].dtype == torch.int32 and int(sd["zero_point"]) == 64
    b = ActQuant(STATIC_U8)
    b.load_state_dict(sd)
    assert b.calibrated
    x = torch.linspace(-2, 4, 13)
    assert torch.equal(a(x), b(x))


def test_dynamic_has_no_state_and_ignores_calibration():
    args = QuantArgs(bits=8, symmetric=False, granularity="token", dynamic=True)
    aq = ActQuant(args)
    assert aq.state_dict() == {}
    aq.start_observing()
    assert aq.observer is None
    aq.freeze()
    x = torch.randn(3, 8)
    assert not torch.equal(aq(x), x)  # quantizes immediately, no calibration needed


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_dynamic_per_token_gives_each_row_its_own_range(bits, symmetric):
    g = torch.Generator().manual_seed(0)
    mags = torch.tensor([1e-3, 1.0, 1e3, 1.0])
    x = torch.randn(2, 4, 32, generator=g) * mags.reshape(1, 4, 1)
    x[1, 3] += 5.0  # a row that does not contain 0 in its observed range
    aq = ActQuant(QuantArgs(bits=bits, symmetric=symmetric, granularity="token", dynamic=True))
    y = aq(x)
    assert y.shape == x.shape
    qmin, qmax = qrange(bits, symmetric)
    lo = x.amin(-1).clamp(max=0)
    hi = x.amax(-1).clamp(min=0)
    row_scale = torch.maximum(-lo, hi) / ((qmax - qmin) // 2) if symmetric else (hi - lo) / (qmax - qmin)
    row_err = (y - x).abs().amax(-1)
    assert bool((row_err <= row_scale / 2 * (1 + 1e-5) + 1e-9).all())
    # the tiny row keeps a tiny error; per-tensor would have crushed it to zero
    per_tensor = ActQuant(QuantArgs(bits=bits, symmetric=symmetric, dynamic=True))(x)
    assert torch.equal(per_tensor[0, 0], torch.zeros(32))
    assert float(row_err[0, 0]) < 0.1 * float(x[0, 0].abs().max())


def test_dynamic_per_tensor_single_range():
    x = torch.tensor([[-1.0, 0.5], [2.0, 3.0]])
    aq = ActQuant(QuantArgs(bits=8, symmetric=False, granularity="tensor", dynamic=True))
    y = aq(x)
    s = 4.0 / 255
    assert float((y - x).abs().max()) <= s / 2 + 1e-6
    assert float(y.min()) == pytest.approx(-1.0, abs=s / 2) and float(y.max()) == pytest.approx(3.0, abs=s / 2)


def test_token_granularity_requires_dynamic():
    with pytest.raises(ValueError):
        QuantArgs(granularity="token")


def test_quant_linear_with_calibrated_input_quant_tracks_float():
    torch.manual_seed(0)
    lin = nn.Linear(32, 16)
    q = QuantLinear.from_float(lin, QuantArgs(granularity="channel"), QuantArgs(bits=8, symmetric=False))
    x = torch.randn(64, 32)
    q.input_quant.start_observing()
    with torch.no_grad():
        q(x)
    q.input_quant.freeze()
    with torch.no_grad():
        ref, out = lin(x), q(x)
    assert float((out - ref).abs().max() / ref.abs().max()) < 0.02
    assert not torch.equal(out, QuantLinear.from_float(lin, QuantArgs(granularity="channel"), None)(x))
