"""Percentile and MSE observers, and the reservoir sample they share."""

from __future__ import annotations

import math

import pytest
import torch

from secquant.quant.observers import MinMaxObserver, MSEObserver, PercentileObserver, Reservoir
from secquant.quant.primitives import choose_qparams, fake_quantize


# ---------------------------------------------------------------- reservoir

def test_reservoir_keeps_everything_until_full():
    r = Reservoir(capacity=100, seed=0)
    r.add(torch.arange(30.0))
    r.add(torch.arange(30.0, 60.0))
    assert r.values().tolist() == list(map(float, range(60)))
    assert r.seen == 60


@pytest.mark.parametrize(("chunk", "n"), [(1, 3000), (7, 20_000), (1000, 50_000), (50_000, 50_000)])
def test_reservoir_bounded_and_sample_without_replacement(chunk, n):
    cap = 500
    r = Reservoir(capacity=cap, seed=3)
    data = torch.arange(float(n))
    for i in range(0, n, chunk):
        r.add(data[i:i + chunk])
        assert r.values().numel() == min(cap, i + chunk)
    v = r.values()
    assert v.numel() == cap and r.seen == n
    assert len(set(v.tolist())) == cap  # distinct: items of the stream, never duplicated
    assert bool(((v >= 0) & (v < n)).all())


@pytest.fixture
def four_threads():
    """Large index writes run on several intra-op threads (as on any multi-core host)."""
    before = torch.get_num_threads()
    torch.set_num_threads(4)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("chunk", [1000, 20_000, 200_000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reservoir_is_approximately_uniform(chunk, seed, four_threads):
    cap, n = 2000, 200_000
    r = Reservoir(capacity=cap, seed=seed)
    data = torch.arange(float(n))
    for i in range(0, n, chunk):
        r.add(data[i:i + chunk])
    v = r.values().double()
    # mean of a uniform sample of 0..N-1: N/2, standard error N / sqrt(12 * cap) ~ 0.0065 N
    assert abs(float(v.mean()) - (n - 1) / 2) < 0.03 * n
    # every tenth of the stream is represented ~ equally (expected 200 each, sd ~ 13)
    counts = torch.histc(v, bins=10, min=0, max=n)
    assert float(counts.min()) > 140 and float(counts.max()) < 260
    assert int(counts.sum()) == cap


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_reservoir_sample_does_not_depend_on_chunking(seed, four_threads):
    """One uniform draw per item, in stream order: one big batch == the same stream in small batches."""
    cap, n = 2000, 200_000
    data = torch.arange(float(n))
    whole = Reservoir(capacity=cap, seed=seed)
    whole.add(data)
    chunked = Reservoir(capacity=cap, seed=seed)
    for i in range(0, n, 500):
        chunked.add(data[i:i + 500])
    assert torch.equal(whole.values(), chunked.values())


def test_reservoir_seeded_determinism():
    data = torch.randn(10_000)
    a, b, c = Reservoir(256, seed=1), Reservoir(256, seed=1), Reservoir(256, seed=2)
    for r in (a, b, c):
        r.add(data[:5000])
        r.add(data[5000:])
    assert torch.equal(a.values(), b.values())
    assert not torch.equal(a.values(), c.values())


# ---------------------------------------------------------------- percentile

def test_percentile_clips_single_huge_outlier():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20_000, generator=g)
    x[1234] = 1e4
    pct, mm = PercentileObserver(99.9), MinMaxObserver()
    for chunk in x.split(4096):
        pct.update(chunk)
        mm.update(chunk)
    plo, phi = pct.compute_range()
    mlo, mhi = mm.compute_range()
    assert mhi == 1e4
    assert phi < 5.0 and plo > -5.0
    assert (phi - plo) < 0.01 * (mhi - mlo)
    # the clipped range is close to the bulk's 0.1% / 99.9% quantiles (about +-3.09 for N(0,1))
    assert phi == pytest.approx(3.09, abs=0.25) and plo == pytest.approx(-3.09, abs=0.25)


def test_percentile_equals_torch_quantile_when_reservoir_holds_everything():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(30_000, generator=g) * 2 + 0.5
    obs = PercentileObserver(99.0)
    for chunk in x.split(3000):
        obs.update(chunk)
    lo, hi = obs.compute_range()
    eq = torch.quantile(x, torch.tensor([0.01, 0.99]))
    assert lo == pytest.approx(float(eq[0]), abs=1e-5)
    assert hi == pytest.approx(float(eq[1]), abs=1e-5)


def test_percentile_approximates_torch_quantile_from_a_sample():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200_000, generator=g)
    obs = PercentileObserver(99.0, capacity=16_384, seed=0)
    for chunk in x.split(10_000):
        obs.update(chunk)
    lo, hi = obs.compute_range()
    eq = torch.quantile(x, torch.tensor([0.01, 0.99]))  # ~ -+2.326 for N(0, 1)
    assert lo == pytest.approx(float(eq[0]), abs=0.12)
    assert hi == pytest.approx(float(eq[1]), abs=0.12)


def test_percentile_from_one_large_batch_sees_the_whole_batch(four_threads):
    """A batch larger than the reservoir must be sampled uniformly, not mostly from its start."""
    g = torch.Generator().manual_seed(4)
    x = torch.cat([torch.randn(200_000, generator=g), 10 * torch.randn(200_000, generator=g)])
    obs = PercentileObserver(99.0, capacity=4096, seed=0)
    obs.update(x)
    lo, hi = obs.compute_range()
    eq = torch.quantile(x[::4], torch.tensor([0.01, 0.99]))  # the mixture's quantiles (~ -+21)
    assert lo == pytest.approx(float(eq[0]), rel=0.15)
    assert hi == pytest.approx(float(eq[1]), rel=0.15)


def test_percentile_100_is_minmax_and_range_within_extremes():
    x = torch.tensor([-3.0, -1.0, 0.0, 2.0, 7.0])
    full = PercentileObserver(100.0)
    full.update(x)
    assert full.compute_range() == (-3.0, 7.0)
    p = PercentileObserver(60.0)
    p.update(x)
    lo, hi = p.compute_range()
    assert -3.0 <= lo < hi <= 7.0
    assert (lo, hi) == pytest.approx(tuple(torch.quantile(x, torch.tensor([0.4, 0.6])).tolist()))


@pytest.mark.parametrize("bad", [50.0, 10.0, 100.5])
def test_percentile_rejects_bad_percentile(bad):
    with pytest.raises(ValueError):
        PercentileObserver(bad)


def test_percentile_ignores_nan():
    obs = PercentileObserver(100.0)
    obs.update(torch.tensor([1.0, float("nan"), 3.0, float("inf")]))
    assert obs.compute_range() == (1.0, 3.0)


# ---------------------------------------------------------------- MSE

def _mse(v, lo, hi, bits, signed, symmetric):
    s, z = choose_qparams(torch.tensor(lo), torch.tensor(hi), bits, signed, symmetric)
    return float(((fake_quantize(v, s, z, bits, signed) - v) ** 2).mean())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dist", ["student_t", "laplace"])
@pytest.mark.parametrize(("signed", "symmetric"), [(False, False), (True, True)])
def test_mse_observer_beats_minmax_on_heavy_tails(bits, dist, signed, symmetric):
    torch.manual_seed(0)
    if dist == "student_t":
        v = torch.distributions.StudentT(2.0).sample((20_000,))
    else:
        v = torch.distributions.Laplace(0.0, 1.0).sample((20_000,))
    mse = MSEObserver(bits=bits, signed=signed, symmetric=symmetric)
    mm = MinMaxObserver()
    for chunk in v.split(5000):
        mse.update(chunk)
        mm.update(chunk)
    lo, hi = mse.compute_range()
    mlo, mhi = mm.compute_range()
    # the search only shrinks the min-max range, by factors in [min_ratio, 1]
    assert mlo <= lo <= 0.2 * mlo + 1e-6 and 0.2 * mhi - 1e-6 <= hi <= mhi
    err_mse = _mse(v, lo, hi, bits, signed, symmetric)
    err_mm = _mse(v, mlo, mhi, bits, signed, symmetric)
    assert err_mse < err_mm
    if bits == 4:
        assert err_mse < 0.95 * err_mm  # clipping clearly pays off at low bit width


def test_mse_observer_keeps_full_range_for_uniform_data_at_8_bits():
    v = torch.linspace(-1, 1, 4001)
    obs = MSEObserver(bits=8, signed=True, symmetric=True)
    obs.update(v)
    lo, hi = obs.compute_range()
    # uniform data has no tails to clip: the best range stays near the extremes
    assert lo == pytest.approx(-1.0, abs=0.05) and hi == pytest.approx(1.0, abs=0.05)


def test_mse_observer_ignores_non_finite():
    obs = MSEObserver(bits=8)
    obs.update(torch.tensor([-1.0, float("nan"), 1.0, float("inf")]))
    lo, hi = obs.compute_range()
    assert math.isfinite(lo) and math.isfinite(hi) and -1.0 <= lo < 0 < hi <= 1.0
