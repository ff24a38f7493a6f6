"""Undo reparametrizations that keep a network's function before a watermark is scored: permuted hidden units and
signed per-row / per-column scales, fitted against the owner's float weights.

Everything here sees only the suspect's and the float weights (and the owner's grid), never a key, so a watermark
test computed on the aligned weights keeps its false-positive bound. Written here rather than taken from a library:
weight matching (e.g. git re-basin) solves the same assignment, but for whole networks with known wiring; this
matches each layer on its own, with scipy's Hungarian solver.
"""

from __future__ import annotations

from typing import Any

import torch

MAX_MATCH = 4096  # hidden units matched by assignment at most (an n x n cost matrix, O(n^3) Hungarian)


def _balanced(w: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """|w| with its rows and columns alternately normalized (Sinkhorn): the same matrix whatever signed scales
    multiply its rows and columns, and permuting w permutes it alike, so units can be matched before scales."""
    b = w.abs()
    b = b.clamp(max=100.0 * float(_median(b))) + 1e-30  # a planted huge entry would own its row and column
    for _ in range(iters):
        b = b / b.sum(1, keepdim=True)
        b = b / b.sum(0, keepdim=True)
    return b


def _corr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Pearson correlation of every row of x with every row of y, [len(x), len(y)]."""
    x = x - x.mean(1, keepdim=True)
    y = y - y.mean(1, keepdim=True)
    x = x / x.norm(dim=1, keepdim=True).clamp(min=1e-30)
    y = y / y.norm(dim=1, keepdim=True).clamp(min=1e-30)
    return x @ y.T


def _assign(cost: torch.Tensor) -> torch.Tensor:
    """perm with suspect index perm[j] matched to float index j, minimizing the total cost[j, i] (Hungarian)."""
    from scipy.optimize import linear_sum_assignment

    _, cols = linear_sum_assignment(cost.numpy())
    return torch.as_tensor(cols, dtype=torch.int64)


def _match_units(ws: torch.Tensor, wf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column permutations that line the suspect's hidden units up with the float model's. On the balanced
    |w| (blind to signed scales) rows are first matched by their sorted entries (blind to column order too), then
    columns and rows alternately by correlation; of two starts (rows as they are, rows by sorted entries) the one
    closer to the float weights wins."""
    rows, cols = ws.shape
    bs, bf = _balanced(ws), _balanced(wf)
    best = None
    by_sorted = _assign(torch.cdist(bf.sort(dim=1).values * cols, bs.sort(dim=1).values * cols))
    for perm_r in (torch.arange(rows), by_sorted):
        for _ in range(3):
            perm_c = _assign(1.0 - _corr(bf.T, bs[perm_r].T))
            perm_r = _assign(1.0 - _corr(bf, bs[:, perm_c]))
        fit = float(_corr(bf.reshape(1, -1), bs[perm_r][:, perm_c].reshape(1, -1)))
        if best is None or fit > best[0]:
            best = (fit, perm_r, perm_c)
    return best[1], best[2]


def _scale_fit(ws: torch.Tensor, wf: torch.Tensor, iters: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ws / (r c^T), r, c): per-row and per-column signed scales fitted by alternating least squares, ws ~
    diag(r) wf diag(c), with Huber weights (entries whose residual exceeds 3 robust sigmas count less), so that a few
    planted huge values, where they cost the attacker nothing, cannot drag a whole row's or column's scale."""
    r = torch.ones(ws.shape[0], dtype=ws.dtype)
    c = torch.ones(ws.shape[1], dtype=ws.dtype)

    def fit(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
        out = num / den.clamp(min=1e-300)
        out = torch.where(den > 1e-12 * den.max(), out, torch.ones_like(out))  # a ~zero float row/column: no fit
        mag = out.abs().clamp(min=1e-3 * float(out.abs().median()) + 1e-30)  # a zeroed row must not divide by 0
        return torch.where(out < 0, -mag, mag)

    for _ in range(iters):
        resid = (ws - r[:, None] * wf * c[None, :]).abs()
        sigma = 1.4826 * float(_median(resid)) + 1e-30
        w = (3.0 * sigma / resid.clamp(min=1e-300)).clamp(max=1.0)
        x = wf * c
        r = fit((w * ws * x).sum(1), (w * x * x).sum(1))
        y = wf * r[:, None]
        c = fit((w * ws * y).sum(0), (w * y * y).sum(0))
    return ws / (r[:, None] * c[None, :]), r, c


def _median(x: torch.Tensor) -> torch.Tensor:
    """The median of all entries (torch.median on a flat view; quantile() refuses large tensors)."""
    return x.reshape(-1).median()


def _rank_corr(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman correlation of all entries: a few planted outliers cannot move it the way they move Pearson's."""
    rx = torch.empty_like(x.reshape(-1)).scatter_(0, x.reshape(-1).argsort(), torch.arange(x.numel(), dtype=x.dtype))
    ry = torch.empty_like(y.reshape(-1)).scatter_(0, y.reshape(-1).argsort(), torch.arange(y.numel(), dtype=y.dtype))
    return float(_corr(rx[None, :], ry[None, :]))


def align_units(ws: torch.Tensor, wf: torch.Tensor, hr: torch.Tensor,
                hc: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
    """The suspect's weights ws [rows, cols] with reparametrizations that keep the function undone, and what was
    undone: per-row and per-column signed scales (_scale_fit) and, when the scaled weights' ranks still correlate less
    than 1/2 with the float ones wf (a quantized copy: > 0.9), a permutation of hidden units (_match_units; layers up to
    MAX_MATCH units a side). Fits run on weights multiplied by hr (per row) and hc (per column), chosen so that the
    owner's rounding noise is the same size everywhere. The mark, a small residual, keeps almost all its energy."""
    rows, cols = ws.shape
    w_h = hr[:, None] * hc[None, :]
    fh = wf * w_h

    def fitted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
        out, r, c = _scale_fit(x * w_h, fh)
        return out, r, c, _rank_corr(out, fh)

    if max(rows, cols) > MAX_MATCH:  # too wide to match units: scales only
        out, r, c = _scale_fit(ws * w_h, fh)
        fit = float("nan")
    else:
        out, r, c, fit = fitted(ws)
    moved = {"rows_moved": 0, "cols_moved": 0}
    if fit <= 0.5:
        perm_r, perm_c = _match_units(ws, wf)
        cand = fitted(ws[perm_r][:, perm_c])
        if cand[3] > fit:
            out, r, c, fit = cand
            moved = {"rows_moved": int((perm_r != torch.arange(rows)).sum()),
                     "cols_moved": int((perm_c != torch.arange(cols)).sum())}
    info = {**moved, "fit": fit, "row_scale": [float(r.abs().min()), float(r.abs().max())],
            "negative_rows": int((r < 0).sum()), "negative_cols": int((c < 0).sum())}
    return out / w_h, info
