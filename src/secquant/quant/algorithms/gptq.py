"""GPTQ (Frantar et al., 2022): quantize a weight column by column, pushing each column's
rounding error onto the columns not yet quantized, weighted by the inverse Hessian of the
layer's squared output error, H = 2 X^T X / n.

Groups keep the standard layout (group g = original columns [g*G, (g+1)*G)) even with
activation ordering: each group's qparams are fixed up front from the original weights
("static groups"), so the result is stored like any round-to-nearest group weight.
A Hessian that is not positive definite gets more damping, then a clear error; never NaN.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ...errors import CalibrationError
from ..schema import GPTQ, QuantArgs, Recipe
from ..modules.weight import mse_range
from ..modules import quantize_module
from ..primitives import PerChannel, PerGroup, PerTensor, choose_qparams, qrange, reduce_range
from .base import CountedBatches, WeightPass, handles
from .gptq_blocks import StageDone, batch_mask, chained_blocks, gptq_by_block
from .gptq_conv import gptq_applies, grouped_gptq, layer_input_rows, n_groups
from .rtn import apply_recipe, plan, set_submodule


class HessianAccumulator:
    """Running H = 2/n * sum_rows x^T x over every input row seen (float64, O(cols^2) memory).

    Given the float model's input `x_float` for the same rows, also C = 2/n * sum_rows x^T x_float
    (see `float_target`).
    """

    def __init__(self) -> None:
        self.H: torch.Tensor | None = None
        self.C: torch.Tensor | None = None
        self.n = 0

    def add(self, x: torch.Tensor, x_float: torch.Tensor | None = None) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).double()
        m = x.shape[0]
        if m == 0:
            return
        if self.H is None:
            self.H = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            if x_float is not None:
                self.C = torch.zeros_like(self.H)
        self.H.mul_(self.n / (self.n + m))
        self.n += m
        self.H.add_(x.t() @ x, alpha=2.0 / self.n)
        if self.C is not None:
            if x_float is None or x_float.numel() != x.numel():
                raise ValueError("float-model inputs must come with every batch, in the same shape")
            self.C.mul_((self.n - m) / self.n)
            self.C.add_(x.t() @ x_float.detach().reshape(-1, x.shape[-1]).double(), alpha=2.0 / self.n)


@torch.no_grad()
def float_target(w: torch.Tensor, H: torch.Tensor, C: torch.Tensor, ridge: float = 1.0) -> torch.Tensor:
    """The weight that best reproduces the float layer's output from the partly quantized model's input.

    With X the float model's inputs to this layer and X~ the inputs it gets once the layers before
    it are quantized (H = X~^T X~, C = X~^T X, scaled alike), W' minimizes
    ||X W^T - X~ W'^T||^2 + lambda ||W' - W||^2, i.e. W'^T = W^T + (H + lambda I)^-1 (C - H) W^T,
    lambda = ridge * mean(diag H). The ridge pulls towards W, not towards 0: where the inputs did not
    change (C = H) W' = W. Fitted on a few thousand calibration tokens W' overfits them; on MiniLM W4
    ridge 0.01 / 0.1 / 1.0 gave mean cosine 0.9857 / 0.9874 / 0.9876 on held-out sentences.
    Since ||X W^T - X~ Q^T||^2 = ||X W^T - X~ W'^T||^2 + ||X~ (W' - Q)^T||^2 (up to the ridge term),
    running GPTQ on W' aims at the float model's output and also compensates the error the
    earlier quantized layers left in X~ (the asymmetric calibration of GPTAQ, Li et al. 2025).
    Returns `w` unchanged when H cannot be factored.
    """
    H = H.double()
    mean_diag = float(torch.diag(H).mean())
    if not math.isfinite(mean_diag) or mean_diag <= 0:
        return w
    L, info = torch.linalg.cholesky_ex(H + ridge * mean_diag * torch.eye(H.shape[0], dtype=H.dtype))
    if int(info) != 0:
        return w
    W = w.double()
    target = W + torch.cholesky_solve((C.double() - H) @ W.t(), L).t()
    return target.to(w.dtype) if torch.isfinite(target).all() else w


def _qparams(w: torch.Tensor, args: QuantArgs, hdiag: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-granule scale / zero point of the original weight: min-max, or the MSE range search
    weighted by diag(H) (each column's error as it reaches the layer's output)."""
    gran = args.granule()
    lo, hi = reduce_range(w, gran)
    if args.observer == "mse":
        lo, hi = mse_range(w, lo, hi, args, importance=hdiag)
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
    scale, zp = _qparams(W.float(), args, torch.diag(H).float())
    col_s, col_z = _column_qparams(scale.double(), zp.double(), args, rows, cols)
    qmin, qmax = qrange(args.bits, args.is_signed)

    gran = args.granule()
    # Without act-order, each group's qparams come from its columns as GPTQ has updated them so far
    # (the reference GPTQ's layout); with act-order they are fixed up front ("static groups").
    dynamic = not act_order and isinstance(gran, PerGroup) and gran.axis in (1, -1)
    if dynamic:
        block_size = gran.group_size * max(1, block_size // gran.group_size)  # no group straddles two blocks
        hdiag = torch.diag(H).float()
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
            if dynamic and (i1 + i) % gran.group_size == 0:
                g, e = (i1 + i) // gran.group_size, min(i + gran.group_size, i2 - i1)
                gs, gz = _qparams(W1[:, i:e].float(), args, hdiag[i1 + i: i1 + e])
                scale[:, g], zp[:, g] = gs[:, 0], gz[:, 0]
                col_s[:, i1 + i: i1 + e], col_z[:, i1 + i: i1 + e] = gs.double(), gz.double()
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
    return q, scale, zp, {"damp": used, "act_order": bool(act_order), "static_groups": not dynamic, "loss": loss}


# ------------------------------------------------------------------------------- the model-level driver

_StageDone = StageDone  # raised from a hook once every layer of the current stage has seen the batch


@torch.no_grad()
def gptq_stages(model: nn.Module, names: list[str], batch, run_batch) -> list[list[str]]:
    """Layers in forward order, grouped when they read the very same input tensor (q, k, v).

    Each stage is quantized before the next one's Hessians are collected, so every layer sees
    inputs that already went through all quantized layers before it (sequential GPTQ).
    """
    order: list[tuple[str, bool]] = []  # (layer, reads the very tensor the layer hooked before it read)
    last: list[torch.Tensor | None] = [None]  # held, so its id cannot be reused by a later tensor

    def hook(mod, inp, name):
        if all(n != name for n, _ in order):
            order.append((name, inp[0] is last[0]))
        last[0] = inp[0]

    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, i, n=n: hook(m, i, n)) for n in names]
    try:
        run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
    last[0] = None
    stages: list[list[str]] = []
    for name, same in order:
        if stages and same:
            stages[-1].append(name)
        else:
            stages.append([name])
    missing = [n for n in names if all(n != o for o, _ in order)]
    if missing:
        raise CalibrationError(f"GPTQ: layers not reached by the model's forward pass: {', '.join(missing[:5])}")
    return stages


class _StageInputs:
    """Hooks that feed one stage's Hessians from each batch: the inputs each layer of the stage gets in the model
    being quantized (and, for float targets, in the float reference); a forward stops once every layer of the
    stage has seen the batch. Padding positions are left out (not activations the model sees in use)."""

    def __init__(self, model: nn.Module, reference: nn.Module | None, stage: list[str]) -> None:
        self.stage = stage
        self.acc = {n: [HessianAccumulator() for _ in range(n_groups(model.get_submodule(n)))] for n in stage}
        self.seen: set[str] = set()
        self.float_inputs: dict[str, torch.Tensor] = {}
        self.mask: torch.Tensor | None = None
        self.n_batches = 0
        self.handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, i, n=n: self._hook(m, i, n))
                        for n in stage]
        if reference is not None:
            self.handles += [reference.get_submodule(n).register_forward_pre_hook(
                lambda m, i, n=n: self._float_hook(i, n)) for n in stage]

    def _real_rows(self, x: torch.Tensor) -> torch.Tensor:
        m = self.mask
        return x[m] if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape) else x

    def _hook(self, mod: nn.Module, inp, name: str) -> None:
        xf = self.float_inputs.get(name)
        fchunks = layer_input_rows(mod, xf) if xf is not None else None
        for i, chunk in enumerate(layer_input_rows(mod, self._real_rows(inp[0].detach()))):  # conv: im2col rows
            for j, (a, x) in enumerate(zip(self.acc[name], chunk)):
                a.add(x, fchunks[i][j] if fchunks is not None else None)
        self.seen.add(name)
        if len(self.seen) == len(self.stage):
            raise _StageDone

    def _float_hook(self, inp, name: str) -> None:
        self.float_inputs[name] = self._real_rows(inp[0].detach())
        if len(self.float_inputs) == len(self.stage):
            raise _StageDone

    def start_batch(self, mask: torch.Tensor | None) -> None:
        self.seen.clear()
        self.float_inputs.clear()
        self.mask = mask
        self.n_batches += 1

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


@handles(GPTQ)
def run_gptq(model: nn.Module, recipe: Recipe, wp: WeightPass) -> tuple[dict[str, dict], int]:
    """Sequential GPTQ: each stage's Hessians come from inputs that already went through the
    quantized stages before it; memory is one H per layer of the stage (no stored activations), or, for a
    model that runs a chain of blocks (a transformer's layers), one block's inputs (gptq_blocks: decoder
    layer by decoder layer, each block run on cached inputs instead of the whole model per stage).

    With smoothing, layer y = (x/s)(W s)^T is quantized as W s with the Hessian of x/s; with a
    rotation R, as W s R with the Hessian of (x/s) R.
    """
    batches, run_batch, smooth = wp.batches, wp.run_batch, wp.prep
    todo = plan(model, recipe)
    gptq_names = [n for n, (t, w, _) in todo.items() if gptq_applies(t, model.get_submodule(n), w)]
    others = set(todo) - set(gptq_names)
    reference = copy.deepcopy(model) if recipe.algorithm.float_targets else None  # the float model, untouched
    layers = apply_recipe(model, recipe, only=others) if others else {}  # embeddings, LSTM, ...: RTN
    cfg = recipe.algorithm
    first = next(iter(batches()), None)
    if first is None:
        raise CalibrationError("GPTQ needs calibration data: the calibration set is empty")
    stages = gptq_stages(model, gptq_names, first, run_batch)
    samples = 0
    tick = wp.progress("GPTQ blocks", len(stages))

    def quantize_stage(stage: list[str], hooks: _StageInputs) -> None:
        if hooks.n_batches == 0:
            raise CalibrationError("GPTQ needs calibration data: the calibration set is empty")
        for name in stage:
            layers[name] = _quantize_layer(model, name, todo[name], hooks.acc[name], smooth.get(name), recipe)

    chain = chained_blocks(model, stages, first, run_batch)
    if chain is not None:
        prefix = chain[0]
        in_blocks = [s for s in stages if s[0].startswith(prefix + ".")]
        stages = stages[len(in_blocks):]  # after the blocks (an LM head): stage by stage over the whole model
        passes: list[CountedBatches] = []

        def counted_batches() -> CountedBatches:
            passes.append(CountedBatches(batches()))
            return passes[-1]

        gptq_by_block(model, reference, prefix, in_blocks, counted_batches, run_batch,
                      lambda stage: _StageInputs(model, reference, stage), quantize_stage, tick)
        samples = max(p.samples for p in passes)
    for stage in stages:
        hooks = _StageInputs(model, reference, stage)
        try:
            with torch.no_grad():
                counted = CountedBatches(batches())
                for b in counted:
                    hooks.start_batch(batch_mask(b))
                    for m in (reference, model) if reference is not None else (model,):
                        try:
                            run_batch(m, b)
                        except _StageDone:
                            pass
        finally:
            hooks.remove()
        samples = max(samples, counted.samples)
        quantize_stage(stage, hooks)
        tick(1)
    return {n: layers[n] for n in todo}, samples


def _quantize_layer(model: nn.Module, name: str, todo_entry, accs: list[HessianAccumulator], prep,
                    recipe: Recipe) -> dict:
    """GPTQ on one layer from its accumulated Gram matrices (one per group of a grouped convolution); the layer
    is replaced in `model`. Its manifest entry."""
    t, wargs, aargs = todo_entry
    cfg = recipe.algorithm
    mod = model.get_submodule(name)
    if accs[0].n == 0:
        raise CalibrationError(f"GPTQ: layer {name!r} is not reached by the model's forward pass")
    w = mod.weight.detach().float()
    w = w.t() if t == "Conv1D" else w.reshape(w.shape[0], -1)  # a conv kernel as [out, in/g * k]
    # the layer holds its smoothing scale s and rotation R; GPTQ quantizes W s R under the Gram
    # matrices of (x / s) R, and the codes replace the layer's round-to-nearest ones below
    qmod = quantize_module(mod, t, wargs, aargs, prep, recipe.rotation)
    w = qmod.weight_space(w)
    gram = getattr(qmod, "input_gram", lambda G: G)  # convolutions: no smoothing or rotation

    def target(wi, a):
        return wi if a.C is None else float_target(wi, gram(a.H), gram(a.C), cfg.float_targets_ridge)

    def run(wi, H):
        return gptq_quantize(wi, gram(H), wargs, damp=cfg.damp, act_order=cfg.act_order, block_size=cfg.block_size)

    q, scale, zp, info = grouped_gptq(w, accs, run, target)
    qmod.set_quantized(q, scale, zp)
    set_submodule(model, name, qmod)
    entry = qmod.layer_info(t)
    entry["config"]["gptq"] = {**info, "float_targets": accs[0].C is not None}
    entry["algorithm"] = "gptq"
    return entry
