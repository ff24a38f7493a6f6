"""Integer ranges and the choice of scale / zero point from observed ranges."""

from __future__ import annotations

import torch

EPS = torch.finfo(torch.float32).eps


def qrange(bits: int, signed: bool) -> tuple[int, int]:
    """(qmin, qmax) of a `bits`-wide integer, two's complement when signed."""
    if not 1 <= bits <= 16:
        raise ValueError(f"bits must be in 1..16, got {bits}")
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def choose_qparams(
    x_min: torch.Tensor,
    x_max: torch.Tensor,
    bits: int,
    signed: bool,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and integer zero point so that [x_min, x_max] (widened to hold 0) maps onto the grid.

    Symmetric: zero point at the middle of the grid, scale = max|x| / qmax_pos.
    Asymmetric: the full grid spans [min(x_min, 0), max(x_max, 0)], so 0 is exact.
    """
    qmin, qmax = qrange(bits, signed)
    x_min = torch.minimum(x_min.float(), torch.zeros_like(x_min, dtype=torch.float32))
    x_max = torch.maximum(x_max.float(), torch.zeros_like(x_max, dtype=torch.float32))
    if symmetric:
        amax = torch.maximum(-x_min, x_max)
        half = (qmax - qmin) // 2  # 127 for int8, 7 for int4
        scale = torch.clamp(amax / half, min=EPS)
        mid = 0 if signed else (qmax + 1) // 2
        zero_point = torch.full_like(scale, mid, dtype=torch.int32)
    else:
        scale = torch.clamp((x_max - x_min) / (qmax - qmin), min=EPS)
        zero_point = torch.clamp(qmin - torch.round(x_min / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point
