"""What stayed in float after a recipe ran: every module that holds float parameters or buffers of its own and was
not replaced by a quantized layer, with the reason; and what `strict` refuses.

What `strict` refuses: a module the recipe did not choose to leave in float (its type has no quantized version)
holding a parameter with at least two dimensions larger than 1, i.e. a weight matrix, kernel or table.
Normalization parameters, biases, scalars and per-channel vectors (1-D), a class token ([1, 1, D]) and
BatchNorm folded into the layer before it are fine; so are layers the recipe itself leaves in float (its
`ignore` patterns, `skip` overrides, `weights: null`, `targets`): that is the user's decision, recorded
with its reason.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..modules import float_layer_type
from ..schema import Recipe

NORMALIZATION = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm, nn.modules.instancenorm._InstanceNorm,
                 nn.LocalResponseNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
UNSUPPORTED = "type not supported"
# reasons that are the recipe's decision (allowed under strict)
RECIPE_REASONS = ("ignored by recipe", "type not in recipe targets", "weights left in float by the recipe")


def _own_float_tensors(mod: nn.Module) -> list:
    ts = [t for t in list(mod._parameters.values()) + list(mod._buffers.values()) if t is not None]
    return [t for t in ts if t.is_floating_point()]


def _under(name: str, roots: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in roots for i in range(1, len(parts) + 1))


def _reason(name: str, mod: nn.Module, recipe: Recipe, folded: dict[str, str]) -> str:
    if name in folded:
        return f"folded into {folded[name]}"
    t = float_layer_type(mod)
    if t is not None:
        if t not in recipe.targets:
            return "type not in recipe targets"
        if recipe.resolve(name) is None:
            return "ignored by recipe"
        return "weights left in float by the recipe"
    if isinstance(mod, NORMALIZATION):
        return "normalization kept in float"
    if recipe.resolve(name) is None:  # listed in `ignore` (or skipped): the user's decision
        return "ignored by recipe"
    return UNSUPPORTED


def float_layers(model: nn.Module, recipe: Recipe, layers: dict[str, dict]) -> list[dict[str, Any]]:
    """[{name, type, parameters, reason}] for every module of the quantized `model` holding float tensors of its own
    (parameters and floating buffers; `parameters` counts their elements) that no quantized layer replaced.
    `layers` are the quantized layers' manifest entries (a layer whose weight the recipe kept in float is listed
    too)."""
    folded = {e["config"]["folded_batchnorm"]: n for n, e in layers.items() if e["config"].get("folded_batchnorm")}
    out = []
    for name, e in layers.items():
        if e["weight"]["args"] is None:
            n = sum(t.numel() for t in _own_float_tensors(model.get_submodule(name)) if t.dim() >= 2)
            out.append({"name": name, "type": e["source_type"], "parameters": int(n),
                        "reason": "weights left in float by the recipe"})
    roots = set(layers)
    for name, mod in model.named_modules():
        if _under(name, roots):
            continue
        ts = _own_float_tensors(mod)
        if not ts:
            continue
        out.append({"name": name, "type": type(mod).__name__, "parameters": int(sum(t.numel() for t in ts)),
                    "reason": _reason(name, mod, recipe, folded)})
    return out


def has_weight_matrix(mod: nn.Module) -> bool:
    """A parameter with at least two dimensions larger than 1 (a matrix, kernel or table)."""
    return any(sum(d > 1 for d in p.shape) >= 2 for p in mod._parameters.values() if p is not None)


def strict_violations(model: nn.Module, leftovers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The float leftovers `strict` refuses (see the module docstring)."""
    return [e for e in leftovers if e["reason"] not in RECIPE_REASONS and not e["reason"].startswith("folded into")
            and has_weight_matrix(model.get_submodule(e["name"]))]
