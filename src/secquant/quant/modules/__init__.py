"""Quantized nn.Modules holding packed integers and qparams as plain tensors."""

from __future__ import annotations

from torch import nn

from ..schema import QuantArgs
from .activation import ActQuant, make_observer
from .attention import QuantMultiheadAttention, restore_unfused, unfuse, unfused_modules
from .layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, rotation_block_for
from .state import serialized_size, tensors_for_save
from .weight import QuantizedWeightMixin, qparam_shape

QUANT_CLASSES = {"Linear": QuantLinear, "Conv1d": QuantConv1d, "Conv2d": QuantConv2d,
                 "Embedding": QuantEmbedding}


def float_layer_type(mod: nn.Module) -> str | None:
    """The recipe target name of a float module, or None if it is not quantizable."""
    if isinstance(mod, nn.Linear):
        return "Linear"
    if isinstance(mod, nn.Conv2d):
        return "Conv2d"
    if isinstance(mod, nn.Conv1d):
        return "Conv1d"
    if isinstance(mod, nn.Embedding):
        return "Embedding"
    if type(mod).__name__ == "Conv1D" and type(mod).__module__.startswith("transformers"):
        return "Conv1D"
    return None


def quantize_module(mod: nn.Module, source_type: str, wargs: QuantArgs | None, aargs: QuantArgs | None,
                    prep=None, rotation=None) -> nn.Module:
    """Quantized replacement of a float layer; `prep` (Linear only) carries searched scales and ranges,
    `rotation` (Linear only) the recipe's input rotation."""
    cls = QuantLinear if source_type == "Conv1D" else QUANT_CLASSES[source_type]
    if cls is QuantEmbedding:
        return cls.from_float(mod, wargs)
    if cls is QuantLinear:
        return cls.from_float(mod, wargs, aargs, prep, rotation)
    return cls.from_float(mod, wargs, aargs)


def build_empty(info: dict) -> nn.Module:
    """A quantized layer with zeroed buffers of the right shapes, from its manifest entry."""
    t = info["type"]
    w = info["weight"]
    wargs = QuantArgs.model_validate(w["args"]) if w["args"] is not None else None
    aargs = QuantArgs.model_validate(info["activation"]) if info.get("activation") else None
    shape = tuple(w["shape"])
    cfg = info["config"]
    if t == "Linear":
        q = QuantLinear(cfg["in_features"], cfg["out_features"], info["bias"], wargs, aargs, bool(cfg.get("smooth")),
                        cfg.get("rotation"))
        q.smooth_alpha = cfg.get("smooth_alpha")
        return q
    if t in ("Conv1d", "Conv2d"):
        cls = QuantConv2d if t == "Conv2d" else QuantConv1d
        pad = cfg["padding"] if isinstance(cfg["padding"], str) else tuple(cfg["padding"])
        return cls(shape, info["bias"], wargs, aargs, cfg["stride"], pad, cfg["dilation"], cfg["groups"])
    if t == "Embedding":
        return QuantEmbedding(cfg["num_embeddings"], cfg["embedding_dim"], wargs, cfg["padding_idx"])
    raise ValueError(f"unknown quantized layer type {t!r}")


__all__ = ["ActQuant", "make_observer", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantEmbedding",
           "QuantizedWeightMixin", "qparam_shape", "QUANT_CLASSES", "float_layer_type",
           "quantize_module", "build_empty", "rotation_block_for", "tensors_for_save", "serialized_size",
           "QuantMultiheadAttention", "unfuse", "unfused_modules", "restore_unfused"]
