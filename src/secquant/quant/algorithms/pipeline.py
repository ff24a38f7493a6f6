"""One entry point that runs a recipe on a float model: scale search, weight quantization,
static activation calibration, in that order."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from ...errors import CalibrationError
from ...recipes.schema import Recipe
from .rtn import apply_recipe, calibrate, plan
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
            scale, alpha = search_scale(w, absmean, rows, wargs, aargs, recipe.smoothing)
            w_range = search_clip(w * scale, rows / scale, wargs) if recipe.smoothing.clip and wargs else None
            smooth[name] = LayerPrep(scale, alpha, w_range)
            tick(1)
        used = seen.samples
    layers = apply_recipe(model, recipe, smooth)
    if any(e["activation"] is not None and not e["activation"]["dynamic"] for e in layers.values()):
        seen = _Counted(batches())
        calibrate(model, seen, run_batch, progress("calibrating", n_total))
        used = max(used, seen.samples)
    return layers, used
