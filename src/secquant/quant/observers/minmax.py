"""Min-max and moving-average min-max observers."""

from __future__ import annotations

import torch

from .base import Observer


class MinMaxObserver(Observer):
    """The running extremes of everything seen: no clipping, sensitive to outliers."""

    name = "minmax"

    def __init__(self) -> None:
        super().__init__()
        self.lo = float("inf")
        self.hi = float("-inf")

    def _update(self, x: torch.Tensor) -> None:
        self.lo = min(self.lo, float(x.min()))
        self.hi = max(self.hi, float(x.max()))

    def _range(self) -> tuple[float, float]:
        return self.lo, self.hi


class MovingAverageMinMaxObserver(Observer):
    """Exponential moving average of per-batch extremes (damps one-off outlier batches)."""

    name = "moving_average"

    def __init__(self, momentum: float = 0.9) -> None:
        super().__init__()
        self.momentum = momentum
        self.lo: float | None = None
        self.hi: float | None = None

    def _update(self, x: torch.Tensor) -> None:
        lo, hi = float(x.min()), float(x.max())
        if self.lo is None:
            self.lo, self.hi = lo, hi
        else:
            m = self.momentum
            self.lo = m * self.lo + (1 - m) * lo
            self.hi = m * self.hi + (1 - m) * hi

    def _range(self) -> tuple[float, float]:
        return float(self.lo), float(self.hi)
