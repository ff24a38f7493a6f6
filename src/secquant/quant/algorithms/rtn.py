"""Round-to-nearest quantization of a model by recipe, with static activation calibration."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from ...errors import CalibrationError, ModelError
from ..schema import RTN, Recipe
from ..modules import ActQuant, QuantizedWeightMixin, float_layer_type, quantize_module, unfuse
from .base import WeightPass, handles


def check_finite(model: nn.Module) -> None:
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ModelError(f"tensor {name!r} contains NaN or Inf: fix or retrain the model before quantizing")


def unfuse_attention(model: nn.Module, recipe: Recipe) -> dict[str, dict]:
    """Split PyTorch attention modules into projection layers and move transformer encoder layers off their
    fused path (quant.modules.attention), in place, before anything is planned; an attention module the
    recipe ignores stays whole (and in float)."""
    return unfuse(model, keep=lambda name: recipe.resolve(name) is not None)


def plan(model: nn.Module, recipe: Recipe) -> dict[str, tuple[str, Any, Any]]:
    """name -> (source_type, weight args, activation args) for every module the recipe quantizes."""
    out: dict[str, tuple[str, Any, Any]] = {}
    if float_layer_type(model) is not None:
        raise ModelError(f"the model is a bare {type(model).__name__} layer, which cannot be replaced in place: "
                         "wrap it in a container (e.g. nn.Sequential(layer)) before quantizing")
    # a PyTorch attention module reads its out_proj.weight itself: its layers are quantized only once split
    whole = [n + "." for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    total = _num_weights(model)
    for name, mod in model.named_modules():
        t = float_layer_type(mod)
        if t is None or t not in recipe.targets or any(name.startswith(p) for p in whole):
            continue
        resolved = recipe.resolve(name, mod.weight.numel() / total if t == "Embedding" else None)
        if resolved is None:
            continue
        w, a = resolved
        if t == "Embedding":
            a = None  # inputs are indices
        if t in ("Embedding", "LSTM", "GRU") and w is None:
            continue  # no quantized form with float weights
        if w is None and a is None:
            continue
        out[name] = (t, w, a)
    return out


def _num_weights(model: nn.Module) -> int:
    """The model's parameter count, whichever of its layers are already quantized (their weights are buffers)."""
    quantized = sum(m.rows * m.cols for m in model.modules() if isinstance(m, QuantizedWeightMixin))
    return max(1, sum(p.numel() for p in model.parameters()) + quantized)


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def apply_recipe(model: nn.Module, recipe: Recipe,
                 prep: dict[str, Any] | None = None, only: set[str] | None = None) -> dict[str, dict]:
    """Replace each targeted layer by its quantized version (weights quantized now). In place.

    `prep` maps Linear layer names to the data-driven search's LayerPrep (input scale, weight ranges).
    """
    check_finite(model)
    todo = plan(model, recipe)
    if only is not None:
        todo = {n: v for n, v in todo.items() if n in only}
    if not todo and only is None:
        kinds = ", ".join(recipe.targets)
        raise ModelError(
            f"the model has no quantizable layer ({kinds}) left after the recipe's ignore list; "
            "check the model or the recipe's targets/ignore"
        )
    infos = {}
    total = _num_weights(model)
    for name, (t, w, a) in todo.items():
        q = quantize_module(model.get_submodule(name), t, w, a, (prep or {}).get(name), recipe.rotation)
        share = q.rows * q.cols / total if t == "Embedding" else None
        set_submodule(model, name, q)
        infos[name] = {**q.layer_info(t), "algorithm": "rtn" if w is not None else None}
        if recipe.keeps_small_table(share) and w == recipe.small_tables.weights:  # why it is wider than the recipe's
            infos[name]["config"]["small_table"] = {"share": round(share, 6),
                                                    "max_share": recipe.small_tables.max_share}
    return infos


@torch.no_grad()
def calibrate(model: nn.Module, batches: Iterable, run_batch: Callable[[nn.Module, Any], Any],
              progress: Callable[[int], None] | None = None) -> int:
    """Run calibration batches through the model so static activation observers see real ranges."""
    quantizers = [m for m in model.modules() if isinstance(m, ActQuant) and not m.args.dynamic]
    if not quantizers:
        return 0
    for q in quantizers:
        q.start_observing()
    model.eval()
    n = 0
    for batch in batches:
        run_batch(model, batch)
        n += 1
        if progress:
            progress(1)
    if n == 0:
        raise CalibrationError("calibration data is empty: static activation quantization needs samples")
    for q in quantizers:
        if q.observer is not None and q.observer.count == 0:
            raise CalibrationError("a static activation quantizer saw no calibration data "
                                   "(the layer is not reached by the model's forward pass)")
        q.freeze()
    return n


@handles(RTN)
def run_rtn(model: nn.Module, recipe: Recipe, wp: WeightPass) -> tuple[dict[str, dict], int]:
    """Round-to-nearest for every layer (with the scale search's preparation, if any): reads no data."""
    return apply_recipe(model, recipe, wp.prep), 0
