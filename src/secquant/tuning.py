"""`secquant.tune`: the mixed-precision search (quant.algorithms.mixed_precision) run on a model's
evaluation data, then the recipe it returns quantized and saved like any other.

    res = secquant.tune("builtin:digits", max_drop=1.0, out="digits-tuned")
    print(res.summary["statement"], res.summary["bits_per_layer"])

If no assignment meets the goal, the best model found (smallest drop) is still returned (and saved
when `out` is given), and the summary says plainly that the goal was not met.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .api import QuantizedModel, quantize
from .artifact.fsutil import refuse_existing
from .artifact.manifest import SAFETENSORS_METADATA
from .errors import ModelError, RecipeError
from .fidelity import float_size_bytes
from .models import ModelHandle, load_model
from .quant.algorithms.base import handler_for
from .quant.algorithms.mixed_precision import DEFAULT_CANDIDATES, MixedPrecision, Scorer, candidate_args
from .quant.algorithms.rtn import check_finite
from .quant.schema import Recipe

EVAL_BATCH_SIZE = 32
Progress = Callable[[str, int | None], Callable[[int], None]]
__all__ = ["tune", "TuneResult", "candidate_args"]


@dataclass
class TuneResult:
    """What `tune` decided: the recipe, the JSON-able summary (also in the manifest), the model."""

    recipe: Recipe
    summary: dict[str, Any]
    model: QuantizedModel
    goal_met: bool
    path: Path | None = field(default=None)

    @property
    def bits_per_layer(self) -> dict[str, int | str]:
        return dict(self.summary["bits_per_layer"])


def tune(model: str | ModelHandle, *, max_drop: float, metric: str | None = None, size_budget: int | None = None,
         time_budget: float | None = None, candidates: Iterable[int] = DEFAULT_CANDIDATES,
         data: str | Path | None = None, calib: str | Path | None = None, out: str | Path | None = None,
         overwrite: bool = False, progress: Progress | None = None,
         log: Callable[[str], Any] | None = print, weights: str | None = None, sample_shape: Any = None,
         sample_dtype: Any = None) -> TuneResult:
    """Choose weight bits per layer (or float) to minimize size with the metric drop <= max_drop.

    max_drop is in accuracy points for metric 'accuracy' (1.0 = one percentage point) and in mean
    cosine to the float outputs for 'cosine' (e.g. 0.01). The metric defaults to accuracy for
    classifiers with labelled data, cosine otherwise. size_budget (bytes of model.safetensors) is a
    second constraint; time_budget (seconds) stops the search early, keeping the best model so far.
    The best model found is always returned, and saved when `out` is given, even if the goal was not
    met (summary['goal_met'] is False and summary['statement'] says why). `weights`, `sample_shape` and
    `sample_dtype` are for a factory model spec, as in secquant.quantize.
    """
    t0 = time.perf_counter()
    config = MixedPrecision(max_drop, metric, size_budget, time_budget, tuple(candidates)
                            if isinstance(candidates, Iterable) and not isinstance(candidates, str) else candidates)
    say = log or (lambda msg: None)
    if out is not None:
        refuse_existing(out, overwrite)
    if isinstance(model, ModelHandle):
        handle = model
    elif isinstance(model, (str, Path)):
        handle = load_model(str(model), weights, sample_shape, sample_dtype)  # weights etc.: factory models
    else:
        raise ModelError(f"tune() takes a model spec string or a ModelHandle, got {type(model).__name__}")
    check_finite(handle.module)
    batches = list(handle.adapter.eval_batches(data, EVAL_BATCH_SIZE))
    labelled = bool(batches) and all(y is not None for _, y in batches)
    metric = config.metric or ("accuracy" if handle.adapter.labelled and labelled else "cosine")
    if metric == "accuracy" and not handle.adapter.labelled:
        raise RecipeError(f"metric 'accuracy' is for classifiers; use metric 'cosine' for this {handle.kind}")
    scorer = Scorer(batches, handle.run, handle.module, metric)
    say(f"tuning {handle.spec}")
    found = handler_for(config)(handle.module, config, scorer, tuning_samples=handle.adapter.tuning_samples,
                                float_size=float_size_bytes(handle.module), progress=progress, log=log,
                                artifact_metadata=SAFETENSORS_METADATA, saved=out is not None)
    summary = dict(found.summary, seconds=round(time.perf_counter() - t0, 3))
    qm = quantize(handle, found.recipe, out=out, calib=calib, overwrite=overwrite, progress=progress or
                  (lambda label, total: (lambda n: None)), tuning=summary)
    # The saved model is rebuilt from the recipe by the same code: check it is the one measured.
    mine, theirs = found.module.state_dict(), qm.module.state_dict()
    if not (mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)):
        say("warning: the saved model differs from the one measured during tuning; re-measuring it")
        again = scorer.score(qm.module)
        summary["value"] = round(float(again["value"]), 6)
        summary["drop"] = round(float(summary["float_value"] - summary["value"]), 6)
    if qm.path is not None:
        summary["size_bytes"] = (qm.path / "model.safetensors").stat().st_size
        summary["size_ratio"] = round(summary["size_bytes"] / summary["float_size_bytes"], 6)
    summary["seconds"] = round(time.perf_counter() - t0, 3)
    say(summary["statement"])
    return TuneResult(recipe=found.recipe, summary=summary, model=qm, goal_met=found.goal_met, path=qm.path)
