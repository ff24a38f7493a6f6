"""Saturating affine quantization: q = clamp(round(x / s) + z, qmin, qmax).

This is the seed's Q(x) = floor(C*x + d) with C = 1/s and d = z + 1/2, clamped instead of
wrapped (round-half-to-even at exact ties, as ONNX Runtime does). Scales and zero points are
stored in a compact shape per granularity; these functions broadcast them.
"""

from __future__ import annotations

import math

import torch

from .granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken
from .ranges import choose_qparams, qrange


def _norm_axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for a {ndim}-d tensor")
    return axis % ndim


def group_view(x: torch.Tensor, group_size: int, axis: int) -> torch.Tensor:
    """Move `axis` last, zero-pad it to a multiple of group_size, split into (..., n_groups, g)."""
    axis = _norm_axis(axis, x.ndim)
    x = x.movedim(axis, -1)
    n = x.shape[-1]
    n_groups = math.ceil(n / group_size)
    pad = n_groups * group_size - n
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    return x.reshape(*x.shape[:-1], n_groups, group_size)


def ungroup_view(xg: torch.Tensor, n: int, axis: int, ndim: int) -> torch.Tensor:
    """Inverse of group_view: merge groups, drop the padding, move the axis back."""
    axis = _norm_axis(axis, ndim)
    x = xg.reshape(*xg.shape[:-2], -1)[..., :n]
    return x.movedim(-1, axis)


def reduce_range(x: torch.Tensor, gran: Granularity) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-granule (min, max) in the compact qparam shape of `gran`."""
    if isinstance(gran, PerTensor):
        return x.min(), x.max()
    if isinstance(gran, PerChannel):
        axis = _norm_axis(gran.axis, x.ndim)
        flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)
        return flat.min(dim=1).values, flat.max(dim=1).values
    if isinstance(gran, PerGroup):
        xg = group_view(x, gran.group_size, gran.axis)
        # padding zeros never widen a range that already includes 0 (choose_qparams widens to 0)
        return xg.min(dim=-1).values, xg.max(dim=-1).values
    if isinstance(gran, PerToken):
        return x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)
    raise TypeError(f"unknown granularity {gran!r}")


def expand_qparam(p: torch.Tensor, x: torch.Tensor, gran: Granularity) -> torch.Tensor:
    """Broadcastable view of a compact qparam against x (group granularity excluded)."""
    if isinstance(gran, (PerTensor, PerToken)):
        return p
    if isinstance(gran, PerChannel):
        axis = _norm_axis(gran.axis, x.ndim)
        shape = [1] * x.ndim
        shape[axis] = -1
        return p.reshape(shape)
    raise TypeError(f"expand_qparam does not handle {gran!r}")


def _apply(x: torch.Tensor, gran: Granularity, fn) -> torch.Tensor:
    """Apply fn(x_view, broadcast_index) per granularity; handles the grouped reshape."""
    if isinstance(gran, PerGroup):
        xg = group_view(x, gran.group_size, gran.axis)
        out = fn(xg, lambda p: p.unsqueeze(-1))
        return ungroup_view(out, x.shape[gran.axis], gran.axis, x.ndim)
    return fn(x, lambda p: expand_qparam(p, x, gran))


def quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    signed: bool,
    gran: Granularity = PerTensor(),
) -> torch.Tensor:
    """Saturating quantization to integers (int32 tensor of the same shape as x)."""
    qmin, qmax = qrange(bits, signed)

    def fn(v, bc):
        q = torch.round(v / bc(scale)) + bc(zero_point).to(v.dtype)
        return torch.clamp(q, qmin, qmax)

    return _apply(x.float(), gran, fn).to(torch.int32)


def dequantize(
    q: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    gran: Granularity = PerTensor(),
) -> torch.Tensor:
    """x_hat = (q - z) * s, float32."""

    def fn(v, bc):
        return (v.float() - bc(zero_point).float()) * bc(scale)

    return _apply(q, gran, fn)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    bits: int,
    signed: bool,
    gran: Granularity = PerTensor(),
) -> torch.Tensor:
    """quantize then dequantize, in the input dtype (what an integer kernel would compute)."""
    qmin, qmax = qrange(bits, signed)

    def fn(v, bc):
        s = bc(scale)
        z = bc(zero_point).to(v.dtype)
        return (torch.clamp(torch.round(v / s) + z, qmin, qmax) - z) * s

    return _apply(x, gran, fn).to(x.dtype)


def quantize_tensor(
    x: torch.Tensor, bits: int, signed: bool, symmetric: bool, gran: Granularity = PerTensor()
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min-max qparams for x at `gran`, then quantize: returns (q, scale, zero_point)."""
    lo, hi = reduce_range(x.float(), gran)
    scale, zp = choose_qparams(lo, hi, bits, signed, symmetric)
    return quantize(x, scale, zp, bits, signed, gran), scale, zp
