"""Non-uniform codes: NF4, power-of-two (logarithmic) and k-means codebooks.

A codebook format stores b-bit indices into a sorted table of values. NF4 and power-of-two
tables are fixed and scaled by a per-channel / per-group absmax; k-means tables are fitted
to the weights themselves (one table per tensor or per output channel) and need no scale.
"""

from __future__ import annotations

import torch


def nf4_codebook() -> torch.Tensor:
    """The 16 NormalFloat-4 levels (Dettmers et al., QLoRA): quantiles of N(0, 1), scaled to
    [-1, 1], with an exact zero; 8 positive and 7 negative levels (asymmetric by construction)."""
    offset = 0.9677083  # (1 - 1/(2*15) + 1 - 1/(2*16)) / 2, as in the paper's construction
    pos = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg])
    v = v / v.abs().max()
    return torch.sort(v).values.float()


def pow2_codebook(bits: int) -> torch.Tensor:
    """0 and +-2^-k for k = 0 .. 2^(b-1) - 2: logarithmic levels (multiplication becomes a shift).

    2^b - 1 distinct values; the last code is unused so that the table is symmetric.
    """
    if bits < 2:
        raise ValueError("power-of-two codes need at least 2 bits")
    n = (1 << (bits - 1)) - 1
    mags = torch.pow(2.0, -torch.arange(n, dtype=torch.float32))
    v = torch.cat([-mags, torch.zeros(1), mags.flip(0)])
    return torch.sort(v).values


def nearest_index(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest entry of a sorted codebook, for each element of x.

    codebook [K] applies to all of x; codebook [rows, K] gives each row of a 2-D x its own table.
    """
    mids = (codebook[..., 1:] + codebook[..., :-1]) / 2
    if codebook.ndim == 1:
        return torch.bucketize(x.contiguous(), mids.contiguous())
    return torch.searchsorted(mids.contiguous(), x.contiguous())


def kmeans_codebook(w: torch.Tensor, k: int, per_channel: bool, iters: int = 25) -> torch.Tensor:
    """Sorted 1-D k-means centroids (Lloyd's algorithm) of each row of w, or of all of w.

    Initialized at evenly spaced quantiles, so the result is deterministic. Returns [rows, k]
    when per_channel, else [1, k].
    """
    x = w.float() if per_channel else w.float().reshape(1, -1)
    qs = torch.linspace(0, 1, k + 2, dtype=torch.float32)[1:-1]
    c = torch.quantile(x, qs, dim=1).t().contiguous() if x.shape[1] <= 16_000_000 else None
    if c is None:  # torch.quantile's size limit: estimate the init on a strided subsample
        c = torch.quantile(x[:, :: max(1, x.shape[1] // 1_000_000)], qs, dim=1).t().contiguous()
    c = torch.sort(c, dim=1).values
    for _ in range(iters):
        idx = nearest_index(x, c)
        sums = torch.zeros_like(c).scatter_add_(1, idx, x)
        counts = torch.zeros_like(c).scatter_add_(1, idx, torch.ones_like(x))
        new = torch.where(counts > 0, sums / counts.clamp(min=1), c)  # empty cluster keeps its centroid
        new = torch.sort(new, dim=1).values
        if torch.allclose(new, c):
            c = new
            break
        c = new
    return c
