"""Clipping observers: percentile and MSE-optimal, both over a bounded reservoir sample."""

from __future__ import annotations

import torch

from ..primitives import choose_qparams, fake_quantize
from .base import Observer, Reservoir


class _SampledObserver(Observer):
    """Keeps a bounded reservoir sample of the values seen, and their exact min and max."""

    def _sample(self, capacity: int, seed: int) -> None:
        self.reservoir = Reservoir(capacity, seed)
        self.lo = float("inf")
        self.hi = float("-inf")

    def _update(self, x: torch.Tensor) -> None:
        self.reservoir.add(x)
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))


class PercentileObserver(_SampledObserver):
    """Range = [q_(100-p), q_p] percentiles of the values seen (p=99.99 clips rare outliers)."""

    name = "percentile"

    def __init__(self, percentile: float = 99.99, capacity: int = 1 << 18, seed: int = 0) -> None:
        super().__init__()
        if not 50.0 < percentile <= 100.0:
            raise ValueError("percentile must be in (50, 100]")
        self.percentile = percentile
        self._sample(capacity, seed)

    def _range(self) -> tuple[float, float]:
        v = self.reservoir.values()
        q = torch.tensor([1 - self.percentile / 100, self.percentile / 100], dtype=v.dtype)
        lo, hi = torch.quantile(v, q).tolist()
        return max(lo, self.lo), min(hi, self.hi)


class MSEObserver(_SampledObserver):
    """Range that minimizes the quantization MSE of the values seen, found by grid search.

    Candidates shrink the min-max range by factors in (0, 1]; each is scored by the mean
    squared error of fake-quantizing the reservoir at the target bit width.
    """

    name = "mse"

    def __init__(self, bits: int = 8, signed: bool = False, symmetric: bool = False,
                 grid: int = 100, min_ratio: float = 0.2, capacity: int = 1 << 16, seed: int = 0) -> None:
        super().__init__()
        self.bits, self.signed, self.symmetric = bits, signed, symmetric
        self.grid, self.min_ratio = grid, min_ratio
        self._sample(capacity, seed)

    def _range(self) -> tuple[float, float]:
        v = self.reservoir.values()
        ratios = torch.linspace(self.min_ratio, 1.0, self.grid)
        best, best_err = (self.lo, self.hi), float("inf")
        for r in ratios.tolist():
            lo, hi = self.lo * r, self.hi * r
            s, z = choose_qparams(torch.tensor(lo), torch.tensor(hi), self.bits, self.signed, self.symmetric)
            err = float(((fake_quantize(v, s, z, self.bits, self.signed) - v) ** 2).mean())
            if err < best_err:
                best, best_err = (lo, hi), err
        return best
