"""One entry point that runs a recipe on a float model: scale search, weight quantization,
static activation calibration, in that order."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ...errors import CalibrationError
from ...recipes.schema import Recipe
from ..modules import quantize_module, rotation_block_for
from ..primitives import rotate, rotation_signs
from .rtn import apply_recipe, calibrate, plan, set_submodule
from .smooth import LayerPrep, collect_input_stats, search_clip, search_scale

Tick = Callable[[int], None]


class _Counted:
    """Iterates calibration batches and counts the samples that went through."""

    def __init__(self, batches: Iterable) -> None:
        self.batches, self.samples = batches, 0

    def __iter__(self):
        for b in self.batches:
            first = next(iter(b.values())) if isinstance(b, dict) else b
            self.samples += int(first.shape[0])
            yield b


def quantize_model(model: nn.Module, recipe: Recipe, batches: Callable[[], Iterable] | None,
                   run_batch: Callable[[nn.Module, Any], Any],
                   progress: Callable[[str, int | None], Tick] | None = None) -> tuple[dict[str, dict], int]:
    """Quantize `model` in place. `batches()` yields calibration batches (called once per pass).

    Returns the per-layer manifest entries and the number of calibration samples read (0: no data).
    """
    progress = progress or (lambda label, total: (lambda n: None))
    if recipe.needs_calibration and batches is None:
        raise CalibrationError(f"recipe {recipe.name!r} needs calibration data (static activation ranges or "
                               "scale search): pass --calib FILE")
    n_total = -(-recipe.calibration.num_samples // recipe.calibration.batch_size)
    smooth = None
    used = 0
    if recipe.smoothing is not None:
        todo = {n: v for n, v in plan(model, recipe).items() if v[0] in ("Linear", "Conv1D")}
        seen = _Counted(batches())
        stats = collect_input_stats(model, list(todo), seen, run_batch, recipe.smoothing.max_rows,
                                    recipe.calibration.seed, progress("collecting activations", n_total))
        if not stats:
            raise CalibrationError("calibration data reached none of the layers to smooth")
        smooth = {}
        tick = progress("searching scales", len(stats))
        for name, (absmean, rows) in stats.items():
            t, wargs, aargs = todo[name]
            w = model.get_submodule(name).weight.detach().float()
            if t == "Conv1D":
                w = w.t()
            rot = _rotation_of(recipe, w.shape[1], wargs)
            scale, alpha = search_scale(w, absmean, rows, wargs, aargs, recipe.smoothing, rot)
            clip = recipe.smoothing.clip and wargs is not None and recipe.algorithm != "gptq"  # GPTQ sets its own
            w_range = search_clip(rot(w * scale), rot(rows / scale), wargs) if clip else None
            smooth[name] = LayerPrep(scale, alpha, w_range)
            tick(1)
        used = seen.samples
    if recipe.algorithm == "gptq":
        layers, n = _gptq(model, recipe, batches, run_batch, progress, n_total, smooth or {})
        used = max(used, n)
    else:
        layers = apply_recipe(model, recipe, smooth)
    if any(e["activation"] is not None and not e["activation"]["dynamic"] for e in layers.values()):
        seen = _Counted(batches())
        calibrate(model, seen, run_batch, progress("calibrating", n_total))
        used = max(used, seen.samples)
    return layers, used


def _rotation_of(recipe: Recipe, cols: int, wargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """x -> x R for a Linear layer with `cols` inputs under the recipe's rotation (identity if none)."""
    block = rotation_block_for(recipe.rotation, cols, wargs)
    if block is None:
        return lambda x: x
    signs = rotation_signs(cols, recipe.rotation.seed)
    return lambda x: rotate(x, signs, block)


class _StageDone(Exception):
    """Raised from a hook once every layer of the current stage has seen the batch."""


@torch.no_grad()
def gptq_stages(model: nn.Module, names: list[str], batch, run_batch) -> list[list[str]]:
    """Layers in forward order, grouped when they read the very same input tensor (q, k, v).

    Each stage is quantized before the next one's Hessians are collected, so every layer sees
    inputs that already went through all quantized layers before it (sequential GPTQ).
    """
    order: list[tuple[str, int]] = []

    def hook(mod, inp, name):
        if all(n != name for n, _ in order):
            order.append((name, id(inp[0])))

    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, i, n=n: hook(m, i, n)) for n in names]
    try:
        run_batch(model, batch)
    finally:
        for h in hooks:
            h.remove()
    stages: list[list[str]] = []
    last_input = None
    for name, inp in order:
        if stages and inp == last_input:
            stages[-1].append(name)
        else:
            stages.append([name])
        last_input = inp
    missing = [n for n in names if all(n != o for o, _ in order)]
    if missing:
        raise CalibrationError(f"GPTQ: layers not reached by the model's forward pass: {', '.join(missing[:5])}")
    return stages


def _gptq(model: nn.Module, recipe: Recipe, batches, run_batch, progress, n_total: int,
          smooth: dict[str, LayerPrep]) -> tuple[dict[str, dict], int]:
    """Sequential GPTQ: each stage's Hessians come from inputs that already went through the
    quantized stages before it; memory is one H per layer of the stage (no stored activations).

    With smoothing, layer y = (x/s)(W s)^T is quantized as W s with the Hessian of x/s; with a
    rotation R, as W s R with the Hessian of (x/s) R.
    """
    from .gptq import HessianAccumulator, float_target, gptq_quantize

    todo = plan(model, recipe)
    gptq_names = [n for n, (t, w, _) in todo.items() if t in ("Linear", "Conv1D") and w is not None]
    others = set(todo) - set(gptq_names)
    reference = copy.deepcopy(model) if recipe.gptq.float_targets else None  # the float model, untouched
    layers = apply_recipe(model, recipe, only=others) if others else {}  # embeddings, convs: RTN
    cfg = recipe.gptq
    first = next(iter(batches()), None)
    if first is None:
        raise CalibrationError("GPTQ needs calibration data: the calibration set is empty")
    stages = gptq_stages(model, gptq_names, first, run_batch)
    samples = 0
    tick = progress("GPTQ blocks", len(stages))
    for stage in stages:
        acc = {n: HessianAccumulator() for n in stage}
        seen: set[str] = set()
        float_inputs: dict[str, torch.Tensor] = {}
        mask: list[torch.Tensor | None] = [None]

        def real_rows(x: torch.Tensor) -> torch.Tensor:
            """The rows of real tokens: padding positions are not activations the model sees in use."""
            m = mask[0]
            return x[m] if m is not None and x.dim() == 3 and tuple(x.shape[:2]) == tuple(m.shape) else x

        def hook(mod, inp, name):
            acc[name].add(real_rows(inp[0].detach()), float_inputs.get(name))
            seen.add(name)
            if len(seen) == len(stage):
                raise _StageDone

        def float_hook(mod, inp, name):
            float_inputs[name] = real_rows(inp[0].detach())
            if len(float_inputs) == len(stage):
                raise _StageDone

        hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, i, n=n: hook(m, i, n)) for n in stage]
        if reference is not None:
            hooks += [reference.get_submodule(n).register_forward_pre_hook(lambda m, i, n=n: float_hook(m, i, n))
                      for n in stage]
        n_seen = 0
        try:
            with torch.no_grad():
                counted = _Counted(batches())
                for b in counted:
                    seen.clear()
                    float_inputs.clear()
                    m = b.get("attention_mask") if isinstance(b, dict) else None
                    mask[0] = m.bool() if isinstance(m, torch.Tensor) and m.dim() == 2 else None
                    for m in (reference, model) if reference is not None else (model,):
                        try:
                            run_batch(m, b)
                        except _StageDone:
                            pass
                    n_seen += 1
        finally:
            for h in hooks:
                h.remove()
        samples = max(samples, counted.samples)
        if n_seen == 0:
            raise CalibrationError("GPTQ needs calibration data: the calibration set is empty")
        for name in stage:
            t, wargs, aargs = todo[name]
            mod = model.get_submodule(name)
            if acc[name].n == 0:
                raise CalibrationError(f"GPTQ: layer {name!r} is not reached by the model's forward pass")
            w = mod.weight.detach().float()
            w = w.t() if t == "Conv1D" else w
            # the layer holds its smoothing scale s and rotation R; GPTQ quantizes W s R under the Gram
            # matrices of (x / s) R, and the codes replace the layer's round-to-nearest ones below
            qmod = quantize_module(mod, t, wargs, aargs, smooth.get(name), recipe.rotation)
            w = qmod.weight_space(w)
            H = qmod.input_gram(acc[name].H)
            C = qmod.input_gram(acc[name].C) if acc[name].C is not None else None
            if C is not None:
                w = float_target(w, H, C, cfg.float_targets_ridge)
            q, scale, zp, info = gptq_quantize(w, H, wargs, damp=cfg.damp, act_order=cfg.act_order,
                                               block_size=cfg.block_size)
            qmod.set_quantized(q, scale, zp)
            set_submodule(model, name, qmod)
            entry = qmod.layer_info(t)
            entry["config"]["gptq"] = {**info, "float_targets": C is not None}
            layers[name] = entry
        tick(1)
    return {n: layers[n] for n in todo}, samples
