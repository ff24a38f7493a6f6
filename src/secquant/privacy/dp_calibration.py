"""Differentially private activation ranges for static quantization.

What is private: the calibration set. Each sample (a sentence, an image) is one unit of privacy;
neighbouring data sets differ by adding or removing one sample, so the number of samples n is private
too: it is released with noise as one more coordinate of the same Gaussian vector, and nothing
computed from the exact n is recorded.

How (a public prior, privately refined):

1. The model is calibrated first on *public, data-free* inputs (see `privacy.synthetic`), which
   gives each static activation quantizer a prior range [lo_p, hi_p]. Smoothing scales and any
   other data-reading step also use only those inputs, so they spend no budget.
2. One pass over the private samples (and one over the public ones) runs each sample *alone* (a
   batch of one) and records, for every static quantizer, the minimum and maximum of everything
   that entered it during that sample's forward pass (all quantizers pass values through
   unchanged). A model that reshapes a sample into many rows ([batch*tokens, features]) or mixes
   rows of a batch therefore still yields exactly one statistic per sample; a quantizer that a
   sample does not reach is refused, and so is a batch that does not hold exactly one sample.
3. Each private statistic is clipped to a window around its public mean (half-width = WINDOW
   times its magnitude, at least 5% of the range) and rescaled to [0, 1]; a constant 1 is
   appended (the count). One sample thus moves the vector of k + 1 coordinates (k = 2 x the
   number of shared quantizer inputs) by at most sqrt(k + 1) in L2, whether it is added, removed
   or (the recipe's num_samples cap) shifts another sample in.
4. The sums get Gaussian noise from OpenDP (`make_gaussian`, zero-concentrated DP, OpenDP's
   secure sampler), with the scale found by OpenDP's binary search so that the zCDP ->
   (epsilon, delta) conversion (`make_zCDP_to_approxDP` + `make_fix_delta`) meets the requested
   budget exactly. The whole vector is one Gaussian release, so no further composition is needed.
5. The prior range of each quantizer is rescaled, side by side, by the ratio of the noisy private
   mean (noisy sum / noisy count) of the per-sample minima (maxima) to the same mean on the public
   inputs: the prior keeps its shape (a high percentile, not a mean), the private data sets its scale.

Ranges read no other private statistic; the budget spent is recorded in the artifact's privacy
ledger with the mechanism, accountant, noise scale and the noisy sample count. What it does not
cover: a model that keeps state across forward passes (a cache, a running statistic updated in
eval mode) could carry one sample into another's statistic; secquant's built-ins keep none.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import CalibrationError, SecquantError
from ..quant.modules import ActQuant
from ..quant.primitives import choose_qparams, qrange
from .budget import NEIGHBOURS, check_delta, check_epsilon, resolve_delta

MECHANISM = "Gaussian mechanism (OpenDP make_gaussian) on clipped per-sample activation minima/maxima"
# Half-width of the clipping window, relative to the prior. Narrower windows mean less noise (its
# standard deviation is proportional to the width) but trust the public prior more: on MiniLM the
# synthetic prior alone already lands within 0.001 mean cosine of calibration on real text.
WINDOW = 0.25
# Refuse when the noise standard deviation exceeds this fraction of a window: the ranges would be noise.
MAX_NOISE = 0.25
ACCOUNTANT = "zero-concentrated DP, converted with OpenDP make_zCDP_to_approxDP (single release, no composition)"


class PerSampleRanges:
    """An observer that passes values through and records, per sample, the min and max of everything it
    saw while that sample ran (the caller runs one sample at a time and calls `end_sample` after each)."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float]] = []
        self._lo = self._hi = None

    def update(self, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        v = x.detach().float()
        lo, hi = float(v.min()), float(v.max())
        self._lo = lo if self._lo is None else min(self._lo, lo)
        self._hi = hi if self._hi is None else max(self._hi, hi)

    def end_sample(self) -> bool:
        """Close the current sample; False if the quantizer saw nothing during it."""
        if self._lo is None:
            return False
        self.rows.append((self._lo, self._hi))
        self._lo = self._hi = None
        return True

    def values(self) -> torch.Tensor:
        return torch.tensor(self.rows, dtype=torch.float64).reshape(-1, 2)


def batch_samples(batch: Any) -> int:
    """How many samples a calibration batch holds (dim 0 of the tensor, or of a tokenized dict's tensors)."""
    if isinstance(batch, torch.Tensor):
        return int(batch.shape[0])
    if isinstance(batch, dict):
        sizes = {int(v.shape[0]) for v in batch.values() if isinstance(v, torch.Tensor) and v.ndim > 0}
        if len(sizes) == 1:
            return sizes.pop()
    raise CalibrationError("DP calibration cannot tell how many samples a calibration batch holds")


@dataclass
class DPResult:
    ranges: dict[str, tuple[float, float]]
    ledger: dict[str, Any]


def _prior(q: ActQuant) -> tuple[float, float]:
    qmin, qmax = qrange(q.args.bits, q.args.is_signed)
    s, z = float(q.scale), float(q.zero_point)
    return (qmin - z) * s, (qmax - z) * s


def _windows(priors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(low edge, width) of each statistic's clipping window; priors: [L, 2] (lo, hi)."""
    span = (priors[:, 1] - priors[:, 0]).clamp_min(1e-8)[:, None]
    half = torch.maximum(WINDOW * priors.abs(), 0.05 * span)
    return priors - half, 2 * half


def gaussian_scale(k: int, epsilon: float, delta: float) -> tuple[float, float]:
    """(noise scale sigma, rho) of OpenDP's Gaussian mechanism on a k-vector of sums of per-sample points
    of [0, 1]^k, so that the release is (epsilon, delta)-DP when one sample is added, removed or replaced
    (L2 sensitivity sqrt(k))."""
    import opendp.prelude as dp

    dp.enable_features("contrib")
    dom = dp.vector_domain(dp.atom_domain(T=float, nan=False), size=k)

    def release(scale: float):
        return dp.c.make_fix_delta(dp.c.make_zCDP_to_approxDP(
            dp.m.make_gaussian(dom, dp.l2_distance(T=float), scale=scale)), delta)

    d_in = math.sqrt(k)
    sigma = float(dp.binary_search_param(release, d_in=d_in, d_out=(epsilon, delta)))
    rho = float(dp.m.make_gaussian(dom, dp.l2_distance(T=float), scale=sigma).map(d_in))
    return sigma, rho


def _noisy_sums(sums: torch.Tensor, sigma: float) -> torch.Tensor:
    import opendp.prelude as dp

    dp.enable_features("contrib")
    k = sums.numel()
    meas = dp.m.make_gaussian(dp.vector_domain(dp.atom_domain(T=float, nan=False), size=k),
                              dp.l2_distance(T=float), scale=sigma)
    return torch.tensor(meas([float(v) for v in sums.double().tolist()]), dtype=torch.float64)


def check_budget(epsilon: float, delta: float | None) -> float:
    """Refuse a budget no mechanism can spend (checked before any work); returns delta (default if None).
    The delta < 1/n rule is checked once the private samples are counted."""
    check_epsilon(epsilon)
    return resolve_delta(delta)


def static_quantizers(model: nn.Module) -> dict[str, ActQuant]:
    return {n: m for n, m in model.named_modules() if isinstance(m, ActQuant) and not m.args.dynamic}


def _per_sample_stats(model: nn.Module, quants: dict[str, ActQuant], batches: Iterable, run_batch,
                      progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """[n, L, 2] per-sample (min, max) of everything entering each quantizer while that sample ran alone.

    n is the number of samples actually fed in (one per batch, checked), never a count of activation rows:
    a model that turns a sample into many rows still gives one statistic per sample."""
    recorders = {}
    for n, q in quants.items():
        recorders[n] = q.observer = PerSampleRanges()
    model.eval()
    fed = 0
    try:
        for batch in batches:
            if batch_samples(batch) != 1:
                raise CalibrationError(f"DP calibration runs one sample per batch (got {batch_samples(batch)}): one "
                                       "sample's statistics must not depend on the others")
            run_batch(model, batch)
            fed += 1
            for name, r in recorders.items():
                if not r.end_sample():
                    raise CalibrationError(f"activation quantizer {name!r} was not reached by calibration sample "
                                           f"{fed}: DP calibration can only bound quantizers every sample reaches")
            if progress:
                progress(1)
    finally:
        for q in quants.values():
            q.observer = None
    if fed == 0:
        raise CalibrationError("the calibration data is empty")
    return torch.stack([recorders[name].values() for name in quants], 1)


@torch.no_grad()
def shared_input_groups(model: nn.Module, quants: dict[str, ActQuant], batch, run_batch) -> list[list[int]]:
    """Indices of quantizers grouped by the layer input they read (q, k and v read one tensor): each
    group is one private statistic, scaled by one ratio, so shared inputs are not paid for twice."""
    owner = {id(m.input_quant): n for n, m in model.named_modules() if getattr(m, "input_quant", None) is not None}
    seen: dict[str, torch.Tensor] = {}  # the tensors themselves: kept alive, their ids cannot be reused

    def record(name: str, inp) -> None:  # returns None: a pre-hook's return value would replace the input
        seen.setdefault(name, inp[0])

    hooks = [model.get_submodule(owner[id(q)]).register_forward_pre_hook(
        lambda m, inp, name=name: record(name, inp)) for name, q in quants.items() if id(q) in owner]
    try:
        run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
    groups: dict[Any, list[int]] = {}
    for i, name in enumerate(quants):
        groups.setdefault(id(seen[name]) if name in seen else ("alone", name), []).append(i)
    return list(groups.values())


@torch.no_grad()
def dp_calibrate(model: nn.Module, private_batches: Iterable, public_batches: Iterable,
                 run_batch: Callable[[nn.Module, Any], Any], epsilon: float, delta: float | None = None,
                 progress: Callable[[int], None] | None = None) -> DPResult:
    """Replace the (public-prior) ranges of every static activation quantizer of `model` by
    (epsilon, delta)-DP estimates from `private_batches` (one sample per batch); returns the ranges and a
    ledger entry, which holds a noisy sample count, never the exact one.

    `public_batches` (one sample per batch too) are the data-free inputs the prior ranges came from;
    their per-sample means are the centers of the clipping windows, and each prior range is rescaled by
    the ratio of the private (noisy) to the public mean.
    """
    delta = check_budget(epsilon, delta)
    quants = static_quantizers(model)
    if not quants:
        raise SecquantError("DP calibration is for recipes with static activation ranges; this recipe reads no "
                            "calibration data, so it needs no privacy budget")
    if any(not q.calibrated for q in quants.values()):
        raise CalibrationError("DP calibration needs prior ranges from the public (synthetic) calibration first")
    priors = torch.tensor([_prior(q) for q in quants.values()], dtype=torch.float64)  # [L, 2]
    public_batches = list(public_batches)
    groups = shared_input_groups(model, quants, public_batches[0], run_batch)
    centers = _per_sample_stats(model, quants, public_batches, run_batch).mean(0)  # public: no budget
    stats = _per_sample_stats(model, quants, private_batches, run_batch, progress)  # [n, L, 2]
    n = stats.shape[0]  # private: used for checks (refusals go to the data owner), never recorded
    check_delta(delta, n)
    low, width = _windows(centers)
    unit = ((stats - low) / width).clamp(0, 1)
    # one coordinate per (group, side): the mean of its members' positions, still in [0, 1]
    unit = torch.stack([unit[:, g].mean(1) for g in groups], 1).reshape(n, -1)  # each sample: a point of [0, 1]^(2G)
    k = unit.shape[1]
    rows = torch.cat([unit, torch.ones(n, 1, dtype=unit.dtype)], 1)  # + the count: [0, 1]^(k+1)
    sigma, rho = gaussian_scale(k + 1, epsilon, delta)
    if sigma / n > MAX_NOISE:
        raise CalibrationError(
            f"{n} calibration samples are too few for epsilon={epsilon:g}: the noise would be {sigma / n:.2f} of "
            f"each range's clipping window (limit {MAX_NOISE}); use at least {math.ceil(sigma / MAX_NOISE)} samples "
            "or a larger --dp-epsilon")
    released = _noisy_sums(rows.sum(0), sigma)
    n_dp = max(1.0, float(released[-1]))  # the noisy count (post-processing of the same release)
    noisy = (released[:-1].reshape(-1, 2) / n_dp).clamp(0, 1)
    pub = ((centers - low) / width).clamp(0, 1)  # where the public mean sits in each window
    est = torch.empty_like(centers)
    for j, g in enumerate(groups):  # the group's private shift, applied to each member's window
        est[g] = low[g] + width[g] * (pub[g] + noisy[j] - pub[g].mean(0)).clamp(0, 1)
    # rescale each side of the prior range by private/public; a side whose public mean is ~0 keeps its prior
    tiny = 1e-6 * (priors[:, 1] - priors[:, 0]).abs().clamp_min(1e-12)[:, None]
    ratio = torch.where(centers.abs() > tiny, (est / centers.where(centers.abs() > tiny, torch.ones_like(centers))),
                        torch.ones_like(centers)).clamp(0.25, 4.0)
    new = priors * ratio
    ranges = {}
    for (name, q), (lo, hi) in zip(quants.items(), new.tolist()):
        lo, hi = min(lo, 0.0), max(hi, 0.0)
        if hi - lo <= 0:
            hi = lo + 1e-6
        s, z = choose_qparams(torch.tensor(lo), torch.tensor(hi), q.args.bits, q.args.is_signed, q.args.symmetric)
        q.scale.copy_(s)
        q.zero_point.copy_(z)
        ranges[name] = (lo, hi)
    ledger = {
        "stage": "activation ranges (static quantization)",
        "epsilon": epsilon, "delta": delta, "rho_zcdp": rho,
        "mechanism": MECHANISM, "accountant": ACCOUNTANT,
        "neighbouring": NEIGHBOURS,
        "num_samples_dp": int(round(n_dp)), "statistics": k, "quantizers": len(quants), "noise_scale": sigma,
        "std_of_each_mean_in_window_units": sigma / n_dp,
        "per_sample": "each sample runs alone; its statistic is the min/max over everything a quantizer saw during "
                      "that run, so a sample counts once however the model reshapes it",
        "clipping": f"per statistic, to a window of +-{WINDOW:.0%} around its mean on public data-free synthetic "
                    "inputs; each public prior range is rescaled by the private/public ratio of the means",
    }
    return DPResult(ranges, ledger)
