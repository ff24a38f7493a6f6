"""One-run canary audit: an empirical lower bound on epsilon from membership guesses on random canaries.

Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training Run" (NeurIPS 2023, arXiv:2305.08846):
m canaries are each put into the private data independently with probability 1/2; the mechanism runs once;
the auditor scores every canary from the released output, guesses "in" for the k+ highest scores and "out"
for the k- lowest, abstains on the rest, and counts its correct guesses v out of r = k+ + k-. If the
mechanism is (epsilon, delta)-DP, v cannot exceed what epsilon-randomized response would give, except with
a small probability (their Theorem 5.2, computed as in their Appendix D); the largest epsilon that the
observed v rejects at the chosen confidence is a lower bound on the mechanism's true epsilon.

Why our own code: the conversion is a one-page formula (a binomial tail plus a delta term); the maintained
implementation (jax_privacy.auditing) would pull JAX into a PyTorch package. Tested against closed forms.

Two drivers repeat a secquant mechanism with canaries:
- `training_audit` (DP-SGD QAT): canaries are random binary patterns with random labels, added to the
  training set (add/remove neighbours); the score is LiRA's logit confidence of the canary's label.
- `calibration_audit` (DP calibration): a calibration releases only two numbers per activation quantizer,
  too few to tell many canaries apart, so each canary gets its own calibration run, on the same data plus the
  canary when it is in (add/remove neighbours; with replace-one neighbours the slot holds an ordinary sample
  when it is out). A canary touches only its own run, so the whole set of runs is (epsilon, delta)-DP in
  each canary and the theorem applies unchanged. The canary is an input with extreme activations; the
  score is how far the released ranges move outwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from scipy import stats
from torch import nn

from ..errors import SecquantError
from ..quant.modules import ActQuant
from ..quant.primitives import qrange
from .shadow import logit_confidence, logits_of

CONFIDENCE = 0.95
# Guess sets tried: k+ = f*m highest scores as "in", alone or with as many lowest scores as "out". The
# reported bound is the best of them, each tested at (1 - confidence) / len(grid) (Bonferroni), so the
# choice among them is paid for and the bound stays valid at the stated confidence.
FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4)
TRAINING_CANARIES = 1000
CALIBRATION_RUNS = 200


# ---------------------------------------------------------------------------------------------- the maths

def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """Probability of >= v correct out of r guesses on m canaries if the mechanism is (epsilon, delta)-DP.

    Steinke et al. 2023, Theorem 5.2 / Appendix D: with q = e^eps / (1 + e^eps) (the accuracy of
    eps-randomized response), p = P[Binomial(r, q) >= v] + 2 m delta * max_{1<=i<=v} P[v-i <= Binomial(r, q) < v] / i.
    """
    if not (0 <= v <= r <= m):
        raise SecquantError(f"need 0 <= correct ({v}) <= guesses ({r}) <= canaries ({m})")
    if not (epsilon >= 0 and 0 <= delta <= 1):
        raise SecquantError(f"need epsilon >= 0 and 0 <= delta <= 1, got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = float(stats.binom.sf(v - 1, r, q))
    if v == 0 or delta == 0:
        return min(tail, 1.0)
    below = np.cumsum(stats.binom.pmf(np.arange(v - 1, -1, -1), r, q))  # P[v-i <= B < v], i = 1..v
    alpha = float((below / np.arange(1, v + 1)).max())
    return min(tail + 2 * m * delta * alpha, 1.0)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, confidence: float = CONFIDENCE) -> float:
    """The largest epsilon that v correct of r guesses (m canaries) rejects at `confidence`: with that
    probability the mechanism is not (epsilon', delta)-DP for any epsilon' below it. 0 when nothing is rejected."""
    if not 0 < confidence < 1:
        raise SecquantError(f"confidence must be in (0, 1), got {confidence}")
    level = 1.0 - confidence
    if p_value(m, r, v, 0.0, delta) >= level:
        return 0.0
    lo, hi = 0.0, 1.0
    while p_value(m, r, v, hi, delta) < level:  # p -> 1 as epsilon grows (v <= r), so this ends
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-6:  # p is nondecreasing in epsilon: keep p(lo) < level <= p(hi)
        mid = (lo + hi) / 2
        if p_value(m, r, v, mid, delta) < level:
            lo = mid
        else:
            hi = mid
    return lo


def guess_grid(m: int) -> list[tuple[int, int]]:
    """(k+, k-) pairs tried on m canaries (see FRACTIONS)."""
    grid: list[tuple[int, int]] = []
    for f in FRACTIONS:
        k = max(1, int(round(f * m)))
        for pair in ((k, 0), (k, min(k, m - k))):
            if pair not in grid:
                grid.append(pair)
    return grid


def bound_from_scores(scores: Sequence[float], included: Sequence[bool], delta: float,
                      confidence: float = CONFIDENCE, seed: int = 0) -> dict[str, Any]:
    """Guess membership from `scores` (higher = "in") over the guess grid and convert the best guess set
    into an epsilon lower bound (Bonferroni over the grid). Ties are broken at random (seeded)."""
    s = np.asarray(scores, dtype=float)
    inc = np.asarray(included, dtype=bool)
    m = len(s)
    if m < 2 or len(inc) != m:
        raise SecquantError(f"need at least 2 canaries with one score each (got {m} scores, {len(inc)} flags)")
    s = np.where(np.isnan(s), -np.inf, s)
    order = np.lexsort((np.random.default_rng(seed).random(m), -s))  # descending score, random among ties
    grid = guess_grid(m)
    each = 1.0 - (1.0 - confidence) / len(grid)
    best: dict[str, Any] | None = None
    ceiling = 0.0
    for kp, km in grid:
        top, bottom = order[:kp], order[m - km:] if km else order[:0]
        v = int(inc[top].sum() + (~inc[bottom]).sum())
        r = kp + km
        eps = epsilon_lower_bound(m, r, v, delta, each)
        ceiling = max(ceiling, epsilon_lower_bound(m, r, r, delta, each))
        if best is None or eps > best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": eps, "k_plus": kp, "k_minus": km, "guesses": r, "correct_guesses": v}
    assert best is not None
    auc = _auc(inc, s)
    return {"m": m, "included": int(inc.sum()), **best, "confidence": confidence,
            "delta": delta, "guess_sets_tried": len(grid), "max_attainable": ceiling, "score_auc": auc}


def _auc(inc: np.ndarray, s: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    if inc.all() or not inc.any():
        return None
    return float(roc_auc_score(inc, np.nan_to_num(s, neginf=-1e300)))


# ---------------------------------------------------------------------------------------------- canaries

def audit_rng(seed: int, purpose: int) -> np.random.Generator:
    """The audit's own randomness (canaries and who is in): seeded, so an audit can be repeated."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0xCA7A, purpose]))


def pattern_canaries(m: int, like: torch.Tensor, num_classes: int, rng: np.random.Generator
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """m inputs shaped like `like`'s samples, each entry at random the data's min or max (far from the data
    and from each other, so a model that memorizes them shows it), with random labels."""
    lo, hi = float(like.min()), float(like.max())
    bits = torch.as_tensor(rng.random((m, *like.shape[1:])) < 0.5)
    x = torch.where(bits, torch.tensor(hi), torch.tensor(lo)).to(like.dtype)
    return x, torch.as_tensor(rng.integers(0, num_classes, m), dtype=torch.int64)


def extreme_canary(like: torch.Tensor) -> torch.Tensor:
    """One input whose entries alternate between +-8x the data's largest magnitude: every activation
    range it reaches is pushed to its clipping edge."""
    a = 8.0 * max(float(like.abs().max()), 1.0)
    flat = torch.full((like[0].numel(),), a)
    flat[1::2] = -a
    return flat.reshape(1, *like.shape[1:]).to(like.dtype)


def static_ranges(module: nn.Module) -> np.ndarray:
    """(lo, hi) of every static activation quantizer, in module order: what a calibration releases."""
    out = []
    for m in module.modules():
        if isinstance(m, ActQuant) and not m.args.dynamic:
            qmin, qmax = qrange(m.args.bits, m.args.is_signed)
            s, z = float(m.scale), float(m.zero_point)
            out.append(((qmin - z) * s, (qmax - z) * s))
    if not out:
        raise SecquantError("the released model has no static activation range: there is no calibration output "
                            "to audit")
    return np.asarray(out, dtype=float)


def outward_scores(ranges: np.ndarray) -> np.ndarray:
    """Per run, how far the released ranges moved outwards: sum over statistics of the standardized upper
    ends minus the standardized lower ends (statistics constant over all runs are skipped).
    `ranges`: (runs, quantizers, 2). Uses no membership information, only the released outputs."""
    flat = np.concatenate([ranges[:, :, 1], -ranges[:, :, 0]], axis=1)
    sd = flat.std(0)
    keep = sd > 1e-12 * np.maximum(1.0, np.abs(flat).max(0))
    if not keep.any():
        return np.zeros(len(flat))
    return ((flat[:, keep] - np.median(flat[:, keep], 0)) / sd[keep]).sum(1)


# ---------------------------------------------------------------------------------------------- drivers

def training_audit(train: Callable[[torch.Tensor, torch.Tensor], nn.Module], x: torch.Tensor, y: torch.Tensor,
                   *, num_classes: int, delta: float, canaries: int = TRAINING_CANARIES, seed: int = 0,
                   confidence: float = CONFIDENCE) -> dict[str, Any]:
    """One training run on (x, y) plus a random half of `canaries` pattern canaries; the bound from the
    logit confidence of each canary's label under the released model. `train(x, y)` -> released module."""
    if canaries < 2:
        raise SecquantError(f"--canaries {canaries}: the canary audit needs at least 2 canaries (1000 advised)")
    rng = audit_rng(seed, 1)
    cx, cy = pattern_canaries(canaries, x, num_classes, rng)
    included = rng.random(canaries) < 0.5
    idx = torch.as_tensor(np.flatnonzero(included), dtype=torch.int64)
    released = train(torch.cat([x, cx[idx]]), torch.cat([y.long(), cy[idx]]))
    scores = logit_confidence(logits_of(released.eval(), cx), cy)
    res = bound_from_scores(scores, included, delta, confidence, seed)
    res["canaries"] = ("random binary patterns (each entry the data's min or max) with random labels, each added "
                       "to the training set with probability 1/2; score: logit confidence of the canary's label")
    res["runs"] = 1
    return res


def calibration_audit(calibrate: Callable[[torch.Tensor], nn.Module], x: torch.Tensor, *, num_samples: int,
                      delta: float, runs: int = CALIBRATION_RUNS, replace_one: bool = False, seed: int = 0,
                      confidence: float = CONFIDENCE, progress: Callable[[int], None] | None = None
                      ) -> dict[str, Any]:
    """`runs` calibrations on x[:num_samples - 1], each with the extreme canary put first with probability
    1/2 (`replace_one`: else the ordinary sample x[num_samples - 1] in its place, so n never changes); the
    bound from how far each run's released ranges move outwards. `calibrate(x)` -> released module.
    The base stays below the recipe's sample cap, so adding the canary pushes no sample out."""
    if runs < 2:
        raise SecquantError(f"--canaries {runs}: the canary audit needs at least 2 calibration runs (200 advised)")
    if len(x) < 2 or num_samples < 2:
        raise SecquantError("the canary audit needs at least 2 calibration samples")
    n = min(num_samples, len(x))
    base, filler, canary = x[:n - 1], x[n - 1:n], extreme_canary(x)
    included = audit_rng(seed, 2).random(runs) < 0.5
    ranges = []
    for inc in included:
        slot = canary if inc else filler if replace_one else canary[:0]
        ranges.append(static_ranges(calibrate(torch.cat([slot, base]))))
        if progress:
            progress(1)
    res = bound_from_scores(outward_scores(np.stack(ranges)), included, delta, confidence, seed)
    res["canaries"] = ("one calibration run per canary, the canary (an input with extreme activations) added "
                       "with probability 1/2" + (" (else an ordinary sample in its place)" if replace_one else "")
                       + "; score: how far the released activation ranges move outwards")
    res["neighbours"] = "replace one sample" if replace_one else "add or remove one sample"
    res["runs"] = runs
    return res
