"""One entry point that runs a recipe on a float model: BatchNorm folding (fold.py), scale search, the recipe's
weight algorithm (looked up by its config type, see base.py), static activation calibration, in that order."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ...errors import CalibrationError
from ..schema import Recipe
from ..modules import rotation_block_for
from ..primitives import rotate, rotation_signs
from .base import CountedBatches, Tick, WeightPass, handler_for
from .fold import fold_batchnorm
from .rtn import calibrate, check_finite, plan, unfuse_attention
from .smooth import LayerPrep, collect_input_stats, search_clip, search_scale


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
    check_finite(model)  # before folding spreads a bad BatchNorm statistic into the layer before it
    folded = fold_batchnorm(model, set(plan(model, recipe))) if recipe.fold_batchnorm else {}
    unfuse_attention(model, recipe)  # after folding: torch.fx traces PyTorch attention as a leaf module
    smooth = None
    used = 0
    todo = {n: v for n, v in plan(model, recipe).items() if v[0] in ("Linear", "Conv1D")}
    if recipe.smoothing is not None and todo:  # smoothing scales Linear inputs: a conv-only model has none
        seen = CountedBatches(batches())
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
            clip = recipe.smoothing.clip and wargs is not None and not recipe.algorithm.chooses_ranges
            w_range = search_clip(rot(w * scale), rot(rows / scale), wargs) if clip else None
            smooth[name] = LayerPrep(scale, alpha, w_range)
            tick(1)
        used = seen.samples
    run = handler_for(recipe.algorithm)
    layers, n = run(model, recipe, WeightPass(batches, run_batch, progress, n_total, smooth or {}))
    used = max(used, n)
    for bn_name, layer_name in folded.items():
        layers[layer_name]["config"]["folded_batchnorm"] = bn_name
        model.get_submodule(layer_name).folded_batchnorm = bn_name  # what audits comparing with the float model read
    if any(e["activation"] is not None and not e["activation"]["dynamic"] for e in layers.values()):
        seen = CountedBatches(batches())
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


