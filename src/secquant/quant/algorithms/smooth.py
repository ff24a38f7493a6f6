"""Activation-aware scale migration (AWQ / SmoothQuant style), searched per Linear layer.

For a layer y = x W^T, any positive per-input-channel s gives y = (x / s)(W s)^T exactly in
float. Choosing s_j = mean|x_j|^alpha protects the weight columns that meet large
activations (AWQ) and, with activation quantization, shrinks activation outliers into the
weights (SmoothQuant). alpha is searched on sampled calibration rows by the output error of
the fully quantized layer; alpha = 0 (s = 1) is plain round-to-nearest and is a candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..schema import QuantArgs, Smoothing
from ..modules.weight import best_ratio, mse_range
from ..primitives import (
    PerChannel, PerGroup, PerTensor, PerToken, choose_qparams, dequantize, fake_quantize, group_view, quantize,
    reduce_range,
)


MSE_SEARCH_GRID = 10  # coarser than the final weight range search, to keep the alpha search fast


class _InputStats:
    """Per-channel mean |x| and a seeded random sample of input rows for one layer."""

    def __init__(self, max_rows: int, gen: torch.Generator) -> None:
        self.abs_sum: torch.Tensor | None = None
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.max_rows, self.gen = max_rows, gen

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        s = x.abs().sum(0)
        self.abs_sum = s if self.abs_sum is None else self.abs_sum + s
        self.count += x.shape[0]
        take = min(x.shape[0], self.max_rows)
        idx = torch.randperm(x.shape[0], generator=self.gen)[:take]
        self.rows.append(x[idx])

    def finish(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.cat(self.rows)
        if rows.shape[0] > self.max_rows:
            rows = rows[torch.randperm(rows.shape[0], generator=self.gen)[: self.max_rows]]
        return self.abs_sum / max(self.count, 1), rows


@torch.no_grad()
def collect_input_stats(model: nn.Module, names: list[str], batches: Iterable, run_batch: Callable[[nn.Module, Any], Any],
                        max_rows: int, seed: int = 0,
                        progress: Callable[[int], None] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    stats = {n: _InputStats(max_rows, gen) for n in names}
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, inp, n=n: stats[n].add(inp[0]))
             for n in names]
    try:
        for batch in batches:
            run_batch(model, batch)
            if progress:
                progress(1)
    finally:
        for h in hooks:
            h.remove()
    return {n: s.finish() for n, s in stats.items() if s.count}


def _rtn(w: torch.Tensor, args: QuantArgs) -> torch.Tensor:
    """The weight as the layer will store it (same range choice as QuantizedWeightMixin)."""
    gran = args.granule()
    lo, hi = reduce_range(w, gran)
    if args.observer == "mse":
        lo, hi = mse_range(w, lo, hi, args, grid=MSE_SEARCH_GRID)
    s, z = choose_qparams(lo, hi, args.bits, args.is_signed, args.symmetric)
    return dequantize(quantize(w, s, z, args.bits, args.is_signed, gran), s, z, gran)


def _act(x: torch.Tensor, args: QuantArgs | None) -> torch.Tensor:
    if args is None:
        return x
    gran = PerToken() if args.granularity == "token" else PerTensor()
    lo, hi = reduce_range(x, gran)
    s, z = choose_qparams(lo, hi, args.bits, args.is_signed, args.symmetric)
    return fake_quantize(x, s, z, args.bits, args.is_signed, gran)


@dataclass
class LayerPrep:
    """What the data-driven search decided for one Linear: input scale and weight ranges."""

    scale: torch.Tensor
    alpha: float
    w_range: tuple[torch.Tensor, torch.Tensor] | None = None


@torch.no_grad()
def search_clip(w: torch.Tensor, x: torch.Tensor, args: QuantArgs, max_rows: int = 256,
                ratios: int = 11, min_ratio: float = 0.5) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-granule weight range minimizing the layer's output error on sampled inputs.

    Weight-MSE clipping treats every input channel alike; here a group's error is measured as
    mean_n (x_n,group . (w - q(w))_group)^2, so columns that meet large activations count more.
    """
    gran = args.granule()
    if not isinstance(gran, (PerGroup, PerChannel)) or (isinstance(gran, PerChannel) and gran.axis not in (0, -2)):
        return None
    x = x[:max_rows]
    lo, hi = reduce_range(w, gran)

    def error_at(r: float) -> torch.Tensor:
        s, z = choose_qparams(lo * r, hi * r, args.bits, args.is_signed, args.symmetric)
        diff = w - dequantize(quantize(w, s, z, args.bits, args.is_signed, gran), s, z, gran)
        if isinstance(gran, PerGroup):
            xg = group_view(x, gran.group_size, -1)
            dg = group_view(diff, gran.group_size, -1)
            return torch.einsum("ngk,ogk->nog", xg, dg).pow(2).mean(0)  # [out, groups]
        return (x @ diff.t()).pow(2).mean(0)  # [out]

    r = best_ratio(torch.linspace(1.0, min_ratio, ratios).tolist(), error_at)
    return lo * r, hi * r


@torch.no_grad()
def search_scale(w: torch.Tensor, absmean: torch.Tensor, x: torch.Tensor, wargs: QuantArgs | None,
                 aargs: QuantArgs | None, cfg: Smoothing,
                 rotate: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[torch.Tensor, float]:
    """Best per-input-channel scale for weight w [out, in] given sampled inputs x [rows, in];
    `rotate` (x -> x R) is the layer's input rotation, applied after the scale as the layer does."""
    rotate = rotate or (lambda t: t)
    ref = x @ w.t()
    alphas = [cfg.alpha] if cfg.alpha is not None else torch.linspace(0, 1, cfg.grid).tolist()
    base = absmean.clamp(min=1e-5)
    best = (float("inf"), torch.ones_like(base), 0.0)
    for a in alphas:
        s = base.pow(a)
        s = s / (s.max() * s.min()).sqrt()
        wq = _rtn(rotate(w * s), wargs) if wargs is not None else rotate(w * s)
        err = float(((_act(rotate(x / s), aargs) @ wq.t() - ref) ** 2).mean())
        if err < best[0]:
            best = (err, s, a)
    return best[1], best[2]
