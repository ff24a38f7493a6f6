"""One-run canary audit (Steinke, Nasr and Jagielski 2023): the epsilon conversion against closed forms and
direct sums, its validity and power on a mechanism whose epsilon is known exactly (randomized response), and
the two drivers on tiny mechanisms that do and do not leak."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from secquant.errors import SecquantError
from secquant.audits.canary_audit import (
    bound_from_scores, calibration_audit, epsilon_lower_bound, extreme_canary, guess_grid, outward_scores,
    p_value, pattern_canaries, static_ranges, training_audit,
)
from secquant.quant.modules import ActQuant
from secquant.quant.schema import QuantArgs


# ------------------------------------------------------------------------------------------- the conversion

def _p_direct(m: int, r: int, v: int, eps: float, delta: float) -> float:
    """The paper's p-value written out with exact binomial sums (math.comb), independent of scipy."""
    q = math.exp(eps) / (1 + math.exp(eps))
    pmf = [math.comb(r, j) * q ** j * (1 - q) ** (r - j) for j in range(r + 1)]
    tail = sum(pmf[v:])
    alpha = max((sum(pmf[v - i:v]) / i for i in range(1, v + 1)), default=0.0)
    return min(1.0, tail + 2 * m * delta * alpha)


@pytest.mark.parametrize("m,r,v,eps,delta", [(50, 20, 14, 0.0, 0.0), (50, 20, 14, 0.7, 0.0), (100, 30, 27, 1.5, 1e-3),
                                             (1000, 40, 40, 3.0, 1e-5), (10, 10, 0, 2.0, 0.01)])
def test_p_value_is_the_papers_formula(m, r, v, eps, delta):
    assert p_value(m, r, v, eps, delta) == pytest.approx(_p_direct(m, r, v, eps, delta), rel=1e-9, abs=1e-15)


def test_perfect_guesses_under_pure_dp_match_the_closed_form():
    # delta = 0, v = r: p = q^r, so the bound solves q^r = 1 - confidence: eps = log(q / (1 - q))
    for r, conf in [(10, 0.95), (100, 0.95), (400, 0.99)]:
        q = (1 - conf) ** (1 / r)
        assert epsilon_lower_bound(1000, r, r, 0.0, conf) == pytest.approx(math.log(q / (1 - q)), abs=1e-5)
    assert epsilon_lower_bound(100, 100, 100, 0.0) == pytest.approx(3.4930, abs=1e-3)


def test_bound_is_zero_at_chance_grows_with_correct_guesses_and_shrinks_with_delta():
    assert epsilon_lower_bound(1000, 100, 50, 1e-5) == 0.0
    assert epsilon_lower_bound(1000, 100, 55, 1e-5) == 0.0  # 55 of 100 is not significant at 95%
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-5) for v in range(100, 201, 10)]
    assert bounds == sorted(bounds) and bounds[0] == 0.0 and bounds[-1] > 3.5
    assert epsilon_lower_bound(1000, 1000, 1000, 1e-5) > 5.5  # many perfect guesses: a large bound
    assert epsilon_lower_bound(1000, 200, 190, 1e-4) < epsilon_lower_bound(1000, 200, 190, 0.0)
    assert epsilon_lower_bound(1000, 200, 200, 0.1) == 0.0  # 2 m delta >= 5%: nothing can be shown
    with pytest.raises(SecquantError):
        p_value(10, 5, 6, 1.0, 0.0)
    with pytest.raises(SecquantError):
        epsilon_lower_bound(10, 5, 5, 0.0, confidence=1.0)


def test_guess_grid_and_fields():
    assert guess_grid(1000)[:4] == [(50, 0), (50, 50), (100, 0), (100, 100)] and len(guess_grid(1000)) == 10
    assert all(kp + km <= 3 for kp, km in guess_grid(3))
    rng = np.random.default_rng(0)
    inc = rng.random(1000) < 0.5
    res = bound_from_scores(inc + rng.normal(0, 0.01, 1000), inc, 1e-5)
    assert res["correct_guesses"] == res["guesses"] == res["k_plus"] + res["k_minus"]
    assert 3.5 < res["epsilon_lower_bound"] <= res["max_attainable"] and res["score_auc"] == 1.0
    assert res["m"] == 1000 and res["included"] == int(inc.sum()) and res["guess_sets_tried"] == 10
    assert bound_from_scores(rng.normal(size=1000), inc, 1e-5)["epsilon_lower_bound"] == 0.0
    # ties carry no information: constant scores are guessed at random, not in index order
    assert bound_from_scores(np.zeros(1000), np.arange(1000) < 500, 1e-5)["epsilon_lower_bound"] == 0.0
    with pytest.raises(SecquantError, match="at least 2"):
        bound_from_scores([1.0], [True], 1e-5)


def _randomized_response(eps: float, inc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Scores from an exactly eps-DP mechanism: each canary's bit, flipped with probability 1/(1+e^eps)."""
    keep = rng.random(len(inc)) < math.exp(eps) / (1 + math.exp(eps))
    return np.where(keep, inc, ~inc).astype(float)


def test_bound_holds_and_has_power_on_a_mechanism_of_known_epsilon():
    """Randomized response is exactly eps-DP per canary: the bound must rarely exceed eps (validity) and
    must come close to it when eps is large enough to show with 1000 canaries (power)."""
    rng = np.random.default_rng(7)
    over, bounds3 = 0, []
    for _ in range(40):
        inc = rng.random(1000) < 0.5
        over += bound_from_scores(_randomized_response(1.0, inc, rng), inc, 0.0)["epsilon_lower_bound"] > 1.0
        bounds3.append(bound_from_scores(_randomized_response(3.0, inc, rng), inc, 0.0)["epsilon_lower_bound"])
    assert over <= 2  # 95% confidence: at most ~5% of audits may overshoot, Bonferroni makes it rarer
    assert 2.0 < np.median(bounds3) <= 3.0 + 0.2


# ------------------------------------------------------------------------------------------- canaries

def test_canaries_are_far_from_the_data_and_from_each_other():
    like = torch.rand(50, 1, 8, 8)
    x, y = pattern_canaries(200, like, 10, np.random.default_rng(0))
    assert x.shape == (200, 1, 8, 8) and set(x.unique().tolist()) <= {float(like.min()), float(like.max())}
    assert y.min() >= 0 and y.max() <= 9 and len(y.unique()) == 10
    assert torch.cdist(x.flatten(1), x.flatten(1)).fill_diagonal_(99).min() > 2  # all distinct
    c = extreme_canary(like)
    assert c.shape == (1, 1, 8, 8) and c.max() >= 8 and c.min() <= -8


def _act(lo: float, hi: float) -> ActQuant:
    q = ActQuant(QuantArgs(bits=8, symmetric=False, granularity="tensor"))
    q.scale.fill_((hi - lo) / 255)
    q.zero_point.fill_(round(-lo / ((hi - lo) / 255)))
    return q


def test_static_ranges_and_outward_scores():
    m = nn.Sequential(_act(-1.0, 3.0), nn.ReLU(), _act(0.0, 6.0))
    r = static_ranges(m)
    assert r.shape == (2, 2) and r[0] == pytest.approx([-1.0, 3.0], abs=0.02) and r[1] == pytest.approx([0, 6])
    with pytest.raises(SecquantError, match="no static activation range"):
        static_ranges(nn.Linear(2, 2))
    runs = np.array([[[-1, 3], [0, 6]], [[-2, 3], [0, 6]], [[-1, 5], [0, 6]], [[-1, 3], [0, 6]]], dtype=float)
    s = outward_scores(runs)  # run 1 widened its low end, run 2 its high end; the constant range is skipped
    assert s[1] > s[0] and s[2] > s[0] and s[0] == s[3]


# ------------------------------------------------------------------------------------------- drivers

def _blobs(n: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    x = (torch.nn.functional.one_hot(y, 16).float() * 0.6 + torch.rand(n, 16, generator=g) * 0.4)
    return x, y


def _fit(x: torch.Tensor, y: torch.Tensor, epochs: int = 200) -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 128), nn.ReLU(), nn.Linear(128, 4))
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    for _ in range(epochs):  # full batch: a tiny net that memorizes what it is given
        opt.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    return net


def test_training_audit_finds_a_memorizing_model_and_not_one_that_ignores_canaries():
    x, y = _blobs()
    leaky = training_audit(_fit, x, y, num_classes=4, delta=1e-5, canaries=200, seed=0)
    assert leaky["m"] == 200 and leaky["runs"] == 1 and 0 < leaky["included"] < 200
    assert leaky["score_auc"] > 0.9 and leaky["epsilon_lower_bound"] > 1.5
    blind = training_audit(lambda xa, ya: _fit(xa[:300], ya[:300]), x, y, num_classes=4, delta=1e-5,
                           canaries=200, seed=0)  # releases a model trained without any canary
    assert blind["epsilon_lower_bound"] == 0.0
    with pytest.raises(SecquantError, match="at least 2"):
        training_audit(_fit, x, y, num_classes=4, delta=1e-5, canaries=1)


def test_calibration_audit_add_remove_and_replace_one():
    """Plain min-max ranges leak the extreme canary in every run; ranges that ignore the data leak nothing.
    Add/remove runs see n-1 or n samples; replace-one runs always n."""
    x = torch.rand(40, 6)
    sizes = []

    def minmax(xc: torch.Tensor) -> nn.Module:
        sizes.append(len(xc))
        return nn.Sequential(_act(min(float(xc.min()), 0.0), float(xc.max())))

    res = calibration_audit(minmax, x, num_samples=32, delta=1e-5, runs=60, seed=1)
    assert res["runs"] == 60 and res["neighbours"] == "add or remove one sample"
    assert set(sizes) == {31, 32} and sizes.count(32) == res["included"]
    assert res["score_auc"] == 1.0 and res["epsilon_lower_bound"] > 1.0
    sizes.clear()
    rep = calibration_audit(minmax, x, num_samples=32, delta=1e-5, runs=60, seed=1, replace_one=True)
    assert set(sizes) == {32} and rep["epsilon_lower_bound"] == res["epsilon_lower_bound"]
    flat = calibration_audit(lambda xc: nn.Sequential(_act(0.0, 1.0)), x, num_samples=32, delta=1e-5, runs=60)
    assert flat["epsilon_lower_bound"] == 0.0
    with pytest.raises(SecquantError, match="at least 2"):
        calibration_audit(minmax, x, num_samples=32, delta=1e-5, runs=1)
