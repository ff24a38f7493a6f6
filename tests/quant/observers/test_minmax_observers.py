"""Min-max and moving-average observers; the base class's handling of NaN/Inf and empty input."""

from __future__ import annotations

import math

import pytest
import torch

from secquant.quant.observers import OBSERVERS, MinMaxObserver, MovingAverageMinMaxObserver


def batches(seed=0, n=5):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 7, generator=g) * (i + 1) + i for i in range(n)]


def test_minmax_exact_extremes():
    obs = MinMaxObserver()
    bs = batches()
    for b in bs:
        obs.update(b)
    lo, hi = obs.compute_range()
    allv = torch.cat([b.reshape(-1) for b in bs])
    assert lo == float(allv.min()) and hi == float(allv.max())
    assert obs.count == len(bs)


def test_minmax_single_value_and_order_independence():
    obs1, obs2 = MinMaxObserver(), MinMaxObserver()
    bs = batches(1)
    for b in bs:
        obs1.update(b)
    for b in reversed(bs):
        obs2.update(b)
    assert obs1.compute_range() == obs2.compute_range()
    one = MinMaxObserver()
    one.update(torch.tensor([2.5]))
    assert one.compute_range() == (2.5, 2.5)


@pytest.mark.parametrize("momentum", [0.9, 0.5, 0.0])
def test_moving_average_follows_ema(momentum):
    obs = MovingAverageMinMaxObserver(momentum=momentum)
    bs = batches(2, n=6)
    exp_lo = exp_hi = None
    for b in bs:
        obs.update(b)
        lo, hi = float(b.min()), float(b.max())
        if exp_lo is None:
            exp_lo, exp_hi = lo, hi
        else:
            exp_lo = momentum * exp_lo + (1 - momentum) * lo
            exp_hi = momentum * exp_hi + (1 - momentum) * hi
        got = obs.compute_range()
        assert got[0] == pytest.approx(exp_lo, rel=1e-12, abs=1e-12)
        assert got[1] == pytest.approx(exp_hi, rel=1e-12, abs=1e-12)


def test_moving_average_damps_an_outlier_batch():
    ema = MovingAverageMinMaxObserver(momentum=0.9)
    mm = MinMaxObserver()
    for i in range(10):
        b = torch.tensor([-1.0, 1.0]) if i != 5 else torch.tensor([-1.0, 100.0])
        ema.update(b)
        mm.update(b)
    assert mm.compute_range()[1] == 100.0
    # one outlier batch contributes (1 - m) * 99 * m**4 above the steady value 1.0
    assert ema.compute_range()[1] == pytest.approx(1.0 + 0.1 * 99 * 0.9**4, rel=1e-9)


@pytest.mark.parametrize("cls", [MinMaxObserver, MovingAverageMinMaxObserver])
def test_non_finite_values_are_ignored(cls):
    obs = cls()
    obs.update(torch.tensor([float("nan"), 1.0, float("inf"), -2.0, float("-inf")]))
    obs.update(torch.tensor([0.5, float("nan")]))
    lo, hi = obs.compute_range()
    assert math.isfinite(lo) and math.isfinite(hi)
    if cls is MinMaxObserver:
        assert (lo, hi) == (-2.0, 1.0)
    else:
        assert lo == pytest.approx(0.9 * -2.0 + 0.1 * 0.5)
        assert hi == pytest.approx(0.9 * 1.0 + 0.1 * 0.5)


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_all_non_finite_batch_counts_as_nothing(name):
    obs = OBSERVERS[name]()
    obs.update(torch.tensor([float("nan"), float("inf")]))
    obs.update(torch.empty(0))
    assert obs.count == 0
    with pytest.raises(RuntimeError):
        obs.compute_range()


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_compute_range_before_update_raises(name):
    with pytest.raises(RuntimeError):
        OBSERVERS[name]().compute_range()


@pytest.mark.parametrize("name", sorted(OBSERVERS))
def test_observers_accept_half_precision_and_integer_like_input(name):
    obs = OBSERVERS[name]()
    obs.update(torch.tensor([-1.0, 0.0, 2.0], dtype=torch.float16))
    lo, hi = obs.compute_range()
    assert -1.0 <= lo <= 0.0 + 1e-6 and 0.0 <= hi <= 2.0
