"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's squared output error, H = 2 X^T X / n.

Groups keep the standard layout (group g = original columns [g*G, (g+1)*G)) even with
activation ordering: each group's qparams are fixed up front from the original weights
("static groups"), so the result is stored like any round-to-nearest group weight.
A Hessian that is not positive definite gets more damping, then a clear error; never NaN.
"""

from __future__ import annotations

import math

import torch

from ...errors import CalibrationError
from ...recipes.schema import QuantArgs
from ..modules.weight import mse_range
from ..primitives import PerChannel, PerGroup, PerTensor, choose_qparams, qrange, reduce_range


class HessianAccumulator:
    """Running H = 2/n * sum_rows x^T x over every input row seen (float64, O(cols^2) memory)."""

    def __init__(self) -> None:
        self.H: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        m = x.shape[0]
        if m == 0:
            return
        if self.H is None:
            self.H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        self.H.add_(x.t() @ x, alpha=2.0 / self.n)


def _qparams(w: torch.Tensor, args: QuantArgs) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-granule scale / zero point of the original weight (min-max, or the MSE range search)."""
    gran = args.granule()
    lo, hi = reduce_range(w, gran)
    if args.observer == "mse":
        lo, hi = mse_range(w, lo, hi, args)
    return choose_qparams(lo, hi, args.bits, args.is_signed, args.symmetric)


def _column_qparams(scale: torch.Tensor, zp: torch.Tensor, args: QuantArgs, rows: int, cols: int):
    """Scale / zero point of every column as [rows, cols] views (for per-column quantization)."""
    gran = args.granule()
    if isinstance(gran, PerTensor):
        return scale.expand(rows, cols), zp.expand(rows, cols)
    if isinstance(gran, PerChannel):
        if gran.axis in (0, -2):
            return scale[:, None].expand(rows, cols), zp[:, None].expand(rows, cols)
        return scale[None, :].expand(rows, cols), zp[None, :].expand(rows, cols)
    if isinstance(gran, PerGroup):
        idx = torch.arange(cols) // gran.group_size
        return scale[:, idx], zp[:, idx]
    raise ValueError(f"GPTQ does not handle granularity {gran!r}")


def _inverse_cholesky(H: torch.Tensor, damp: float, tries: int) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of H^-1 after damping; more damping while H is not positive definite."""
    mean_diag = float(torch.diag(H).mean())
    if not math.isfinite(mean_diag) or mean_diag <= 0:
        mean_diag = 1.0
    d = damp
    eye = torch.eye(H.shape[0], dtype=H.dtype)
    for _ in range(tries):
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if int(info) == 0:
            Hinv = torch.cholesky_inverse(L)
            U, info2 = torch.linalg.cholesky_ex(Hinv, upper=True)
            if int(info2) == 0 and torch.isfinite(U).all():
                return U, d
        d *= 10
    raise CalibrationError(
        f"GPTQ: the calibration Hessian is not positive definite even with damping {d / 10:g} "
        "(too few or degenerate calibration samples): add calibration data or raise gptq.damp"
    )


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, H: torch.Tensor, args: QuantArgs, damp: float = 0.01, act_order: bool = True,
                  block_size: int = 128, max_damp_tries: int = 6):
    """Quantize w [rows, cols] given H [cols, cols]. Returns (q int32, scale, zero_point, info)."""
    W = w.detach().double().clone()
    rows, cols = W.shape
    H = H.detach().double().clone()
    if H.shape != (cols, cols):
        raise ValueError(f"Hessian shape {tuple(H.shape)} does not match {cols} input columns")
    if not torch.isfinite(H).all():
        raise CalibrationError("GPTQ: the calibration inputs contain NaN or Inf")
    dead = torch.diag(H) <= 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    scale, zp = _qparams(W.float(), args)
    col_s, col_z = _column_qparams(scale.double(), zp.double(), args, rows, cols)
    qmin, qmax = qrange(args.bits, args.is_signed)

    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    col_s, col_z = col_s[:, perm], col_z[:, perm]
    U, used = _inverse_cholesky(H, damp, max_damp_tries)

    Q = torch.zeros_like(W)
    loss = 0.0
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = W1[:, i]
            d = U1[i, i]
            s, z = col_s[:, i1 + i], col_z[:, i1 + i]
            q = torch.clamp(torch.round(col / s) + z, qmin, qmax)
            Q[:, i1 + i] = q
            err = (col - (q - z) * s) / d
            loss += float((err ** 2).sum()) / 2
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    inv = torch.argsort(perm)
    q = Q[:, inv].to(torch.int32)
    return q, scale, zp, {"damp": used, "act_order": bool(act_order), "loss": loss}
