"""Observers watch calibration activations and propose a clipping range [lo, hi].

They hold statistics only; the quantizer that owns them turns the range into qparams
(AIMET's split between analyzers and quantizers). Ranges are per tensor: activations are
quantized per tensor when static (per token when dynamic, which needs no observer).
"""

from __future__ import annotations

import torch


class Observer:
    """Base: `update` with each calibration batch, then `compute_range`."""

    name = "base"

    def __init__(self) -> None:
        self.count = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().float()
        if not torch.isfinite(x).all():
            x = x[torch.isfinite(x)]
        if x.numel() == 0:
            return
        self.count += 1
        self._update(x)

    def _update(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def compute_range(self) -> tuple[float, float]:
        if self.count == 0:
            raise RuntimeError(f"{self.name} observer saw no data")
        return self._range()

    def _range(self) -> tuple[float, float]:
        raise NotImplementedError


class Reservoir:
    """A fixed-size uniform sample of every value seen (reservoir sampling, seeded).

    Percentile and MSE searches need the value distribution, not only its extremes; keeping
    a bounded sample keeps memory flat however much calibration data flows through.
    """

    def __init__(self, capacity: int = 1 << 18, seed: int = 0) -> None:
        self.capacity = capacity
        self.seen = 0
        self.buf = torch.empty(0)
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1)
        n = flat.numel()
        room = self.capacity - self.buf.numel()
        if room > 0:
            self.buf = torch.cat([self.buf, flat[:room]])
            flat = flat[room:]
            self.seen += min(room, n)
        if flat.numel() == 0:
            return
        # Algorithm R, vectorised: item t (0-based, global) replaces slot j = floor(u * (t + 1)) if j < capacity.
        # Computed in place: only the few accepted items get an integer slot.
        m = flat.numel()
        prod = torch.rand(m, generator=self.gen, dtype=torch.float64)
        prod.mul_(torch.arange(self.seen + 1, self.seen + 1 + m, dtype=torch.float64))
        item = (prod < self.capacity).nonzero().squeeze(1)
        j = prod[item].long()
        # Several items may pick the same slot in one batch: sequential Algorithm R keeps the
        # last one, so resolve collisions explicitly (a plain indexed write has no defined winner).
        winner = torch.full((self.capacity,), -1, dtype=torch.int64).scatter_reduce(0, j, item, "amax")
        slots = (winner >= 0).nonzero().squeeze(1)
        self.buf[slots] = flat[winner[slots]]
        self.seen += flat.numel()

    def values(self) -> torch.Tensor:
        return self.buf
