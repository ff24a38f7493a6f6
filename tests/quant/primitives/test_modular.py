"""Modular mode: the seed's Q(x) = floor(C*x + d) mod p, and its Z_p arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from secquant.quant.primitives import (
    additive_shares, centered_lift, modular_add, modular_decode, modular_encode, quantize, reconstruct,
)

PROP = settings(max_examples=80, deadline=None)

LARGE_PRIMES = [2**61 - 1, 2**31 - 1, 65521, 257, 3]
moduli = st.one_of(st.integers(2, 10_000), st.sampled_from(LARGE_PRIMES + [2**62, 2**32, 256]))


def test_seed_example_exact():
    x = torch.tensor([0.0, 0.25, 0.5, 0.75, 0.999])
    q = modular_encode(x, C=256, d=128, p=256)
    assert q.dtype == torch.int64
    assert q.tolist() == [128, 192, 0, 64, 127]
    # == floor(256 x + 128) mod 256, computed independently
    assert q.tolist() == [math.floor(256 * v + 128) % 256 for v in x.double().tolist()]


def test_modular_wraps_where_saturating_clamps():
    x = torch.tensor([0.0, 0.25, 0.49, 0.5, 0.75, 0.999])
    mod = modular_encode(x, C=256, d=128, p=256)
    # the saturating quantizer with the same grid (scale 1/256, zero point 128, uint8)
    sat = quantize(x, torch.tensor(1 / 256), torch.tensor(128, dtype=torch.int32), 8, False)
    assert mod[3].item() == 0            # 0.5 wraps to the bottom of Z_256 ...
    assert sat[3].item() == 255          # ... while saturation clamps it to qmax
    assert sat[4:].tolist() == [255, 255]
    assert mod[4:].tolist() == [64, 127]
    # saturating codes are monotone in x; modular codes are not
    assert bool((sat[1:] >= sat[:-1]).all())
    assert not bool((mod[1:] >= mod[:-1]).all())


@PROP
@given(
    p=moduli,
    C=st.floats(1e-3, 1e6),
    d=st.floats(-1e6, 1e6),
    xs=st.lists(st.floats(-1e6, 1e6), min_size=1, max_size=16),
)
def test_encode_always_in_zp(p, C, d, xs):
    x = torch.tensor(xs, dtype=torch.float64)
    q = modular_encode(x, C, d, p)
    assert q.dtype == torch.int64
    assert bool((q >= 0).all()) and bool((q < p).all())
    expected = [math.floor(v * C + d) % p for v in xs]
    assert q.tolist() == expected


@PROP
@given(
    p=moduli,
    k=st.integers(0, 16),
    d=st.integers(-1000, 1000),
    kx=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=8),
    ky_seed=st.integers(0, 2**31 - 1),
)
def test_additive_homomorphism_on_grid_points(p, k, d, kx, ky_seed):
    """(Q(x) + Q(y) - d) mod p == Q(x + y) mod p when C*x, C*y are integers and d is an integer."""
    C = float(2**k)  # power of two: x = kx / C is exact in float64
    g = torch.Generator().manual_seed(ky_seed)
    kxt = torch.tensor(kx, dtype=torch.int64)
    kyt = torch.randint(-(2**40), 2**40, kxt.shape, generator=g, dtype=torch.int64)
    x = kxt.double() / C
    y = kyt.double() / C
    assert torch.equal(x * C, kxt.double()) and torch.equal((x + y) * C, (kxt + kyt).double())
    qx, qy, qxy = modular_encode(x, C, d, p), modular_encode(y, C, d, p), modular_encode(x + y, C, d, p)
    lhs = torch.remainder(modular_add(qx, qy, p) - d, p)
    assert torch.equal(lhs, qxy)
    assert lhs.tolist() == [(a + b + d) % p for a, b in zip(kxt.tolist(), kyt.tolist())]


@PROP
@given(p=moduli, a=st.lists(st.integers(0, 2**62), min_size=1, max_size=10), data=st.data())
def test_modular_add_matches_python(p, a, data):
    a = [v % p for v in a]
    b = data.draw(st.lists(st.integers(0, p - 1), min_size=len(a), max_size=len(a)))
    out = modular_add(torch.tensor(a), torch.tensor(b), p)
    assert out.tolist() == [(u + v) % p for u, v in zip(a, b)]


@PROP
@given(
    p=moduli,
    n=st.integers(2, 5),
    seed=st.integers(0, 2**31 - 1),
    vals=st.lists(st.integers(0, 2**62), min_size=1, max_size=12),
)
def test_additive_shares_round_trip(p, n, seed, vals):
    q = torch.tensor([v % p for v in vals], dtype=torch.int64)
    shares = additive_shares(q, p, n, torch.Generator().manual_seed(seed))
    assert len(shares) == n
    for s in shares:
        assert s.shape == q.shape and s.dtype == torch.int64
        assert bool((s >= 0).all()) and bool((s < p).all())
    assert torch.equal(reconstruct(shares, p), q)
    assert sum(s.tolist()[0] for s in shares) % p == q.tolist()[0]


def test_single_share_reveals_nothing_statistically():
    """Each share of a constant secret is uniform on Z_p: its mean is ~ (p-1)/2, not the secret."""
    p = 256
    q = torch.full((20000,), 7, dtype=torch.int64)
    shares = additive_shares(q, p, 3, torch.Generator().manual_seed(0))
    for s in shares:
        assert abs(float(s.double().mean()) - (p - 1) / 2) < 3.0
        counts = torch.bincount(s, minlength=p).double()
        assert float(counts.min()) > 0.5 * 20000 / p
    assert torch.equal(reconstruct(shares, p), q)


def test_shares_need_at_least_two():
    with pytest.raises(ValueError):
        additive_shares(torch.tensor([1]), 7, 1, torch.Generator().manual_seed(0))


@PROP
@given(p=moduli, vals=st.lists(st.integers(-(2**62), 2**62), min_size=1, max_size=12))
def test_centered_lift_window_and_congruence(p, vals):
    q = torch.tensor(vals, dtype=torch.int64)
    lifted = centered_lift(q, p)
    lo, hi = -(p // 2), (p + 1) // 2  # [-floor(p/2), ceil(p/2))
    assert bool((lifted >= lo).all()) and bool((lifted < hi).all())
    assert [v % p for v in lifted.tolist()] == [v % p for v in vals]


def test_centered_lift_examples():
    assert centered_lift(torch.tensor([0, 127, 128, 255]), 256).tolist() == [0, 127, -128, -1]
    assert centered_lift(torch.tensor([0, 1, 2, 3, 4]), 5).tolist() == [0, 1, 2, -2, -1]


@PROP
@given(
    p=st.one_of(st.integers(2, 2**20), st.sampled_from([65521, 257, 3, 2**31 - 1])),
    C=st.floats(0.5, 1e4),
    d=st.floats(-1e3, 1e3),
    t=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=10),
    centered=st.booleans(),
)
def test_decode_recovers_x_in_window(p, C, d, t, centered):
    lo, hi = (-(p // 2), (p + 1) // 2) if centered else (0, p)
    # values v = C*x + d spread over the lift's window
    xs = [((lo + u * (hi - lo)) - d) / C for u in t]
    x = torch.tensor(xs, dtype=torch.float64)
    v = x * C + d
    assume(bool((v >= lo).all()) and bool((v < hi).all()))
    q = modular_encode(x, C, d, p)
    xhat = modular_decode(q, C, d, p, centered=centered)
    assert xhat.dtype == torch.float64
    err = (xhat - x).abs()
    assert float(err.max()) <= 1 / (2 * C) + 1e-9 * (1 + float(x.abs().max()))


def test_decode_seed_parameters_window():
    # C=256, d=128, p=256: the uncentered window [0, 256) holds 256x+128 exactly for x in [-0.5, 0.5)
    x = torch.tensor([-0.5, -0.3, 0.0, 0.2, 0.49], dtype=torch.float64)
    q = modular_encode(x, 256, 128, 256)
    xhat = modular_decode(q, 256, 128, 256, centered=False)
    assert float((xhat - x).abs().max()) <= 1 / 512
    # outside the window, 0.5 has wrapped to code 0 and reads back as -0.5 (+ half a cell)
    q = modular_encode(torch.tensor([0.5], dtype=torch.float64), 256, 128, 256)
    assert float(modular_decode(q, 256, 128, 256, centered=False)) == pytest.approx(-0.5 + 1 / 512)


BAD_P = [1, 0, -5, 2.0, 256.0, "256", None, 2**62 + 1]


@pytest.mark.parametrize("p", BAD_P, ids=repr)
@pytest.mark.parametrize(
    "fn",
    [
        lambda p: modular_encode(torch.tensor([0.5]), 256, 128, p),
        lambda p: centered_lift(torch.tensor([3]), p),
        lambda p: modular_add(torch.tensor([1]), torch.tensor([2]), p),
        lambda p: additive_shares(torch.tensor([1]), p, 2, torch.Generator().manual_seed(0)),
        lambda p: reconstruct([torch.tensor([1]), torch.tensor([2])], p),
        lambda p: modular_decode(torch.tensor([3]), 256, 128, p, centered=True),
    ],
    ids=["encode", "centered_lift", "add", "shares", "reconstruct", "decode-centered"],
)
def test_bad_modulus_raises_value_error(fn, p):
    with pytest.raises(ValueError):
        fn(p)


def test_modular_decode_uncentered_validates_p():
    """The uncentered read-back must reject a bad modulus like every other modular function."""
    for p in BAD_P:
        with pytest.raises(ValueError):
            modular_decode(torch.tensor([3]), 256, 128, p, centered=False)
