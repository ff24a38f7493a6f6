"""Quantized nn.Modules holding packed integers and qparams as plain tensors."""

from __future__ import annotations

from torch import nn

from ..schema import QuantArgs
from .activation import ActQuant, make_observer
from .attention import QuantMultiheadAttention, restore_unfused, unfuse, unfused_modules
from .layers import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, rotation_block_for
from .state import serialized_size, tensors_for_save
from .conv import TRANSPOSED, QuantConv3d, QuantConvTranspose1d, QuantConvTranspose2d, QuantConvTranspose3d, build_conv
from .conv import to_conv_layout
from .recurrent import RECURRENT, QuantGRU, QuantLSTM, QuantMatrix, build_recurrent, recurrent_sizes
from .weight import QuantizedWeightMixin, qparam_shape

QUANT_CLASSES = {"Linear": QuantLinear, "Conv1d": QuantConv1d, "Conv2d": QuantConv2d,
                 "Embedding": QuantEmbedding}
# -- Conv3d, transposed convolutions, LSTM / GRU
QUANT_CLASSES.update({"Conv3d": QuantConv3d, **TRANSPOSED, **RECURRENT})
_MORE_FLOAT_TYPES = {nn.Conv3d: "Conv3d", nn.ConvTranspose1d: "ConvTranspose1d", nn.ConvTranspose2d: "ConvTranspose2d",
                     nn.ConvTranspose3d: "ConvTranspose3d", nn.LSTM: "LSTM", nn.GRU: "GRU"}


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
    for cls, name in _MORE_FLOAT_TYPES.items():
        if isinstance(mod, cls):
            return None if getattr(mod, "proj_size", 0) else name  # LSTM projections: no quantized form
    return None


def stored_weight_shape(mod: nn.Module, source_type: str) -> tuple[list[int], dict]:
    """The weight shape a quantized replacement of float `mod` stores, and the config sizes its manifest entry
    must match (artifact loading checks a manifest against the float architecture with it)."""
    if source_type in RECURRENT:
        return recurrent_sizes(mod)
    w = mod.weight
    if source_type == "Conv1D":
        return [int(w.shape[1]), int(w.shape[0])], {"in_features": int(w.shape[0]), "out_features": int(w.shape[1])}
    if source_type in TRANSPOSED:
        return [int(n) for n in to_conv_layout(w.detach(), mod.groups).shape], {"groups": mod.groups}
    shape = [int(n) for n in w.shape]
    sizes = {"in_features": shape[1], "out_features": shape[0]} if source_type == "Linear" else \
        {"num_embeddings": shape[0], "embedding_dim": shape[1]} if source_type == "Embedding" else {}
    return shape, sizes


def quantize_module(mod: nn.Module, source_type: str, wargs: QuantArgs | None, aargs: QuantArgs | None,
                    prep=None, rotation=None) -> nn.Module:
    """Quantized replacement of a float layer; `prep` (Linear only) carries searched scales and ranges,
    `rotation` (Linear only) the recipe's input rotation."""
    cls = QuantLinear if source_type == "Conv1D" else QUANT_CLASSES[source_type]
    if cls is QuantEmbedding:
        return cls.from_float(mod, wargs)
    if source_type in RECURRENT:
        return cls.from_float(mod, wargs, aargs)
    if cls is QuantLinear:
        return cls.from_float(mod, wargs, aargs, prep, rotation)
    return cls.from_float(mod, wargs, aargs)


def build_empty(info: dict) -> nn.Module:
    """A quantized layer with zeroed buffers of the right shapes, from its manifest entry."""
    q = _build_empty(info)
    if info["config"].get("folded_batchnorm"):  # the BatchNorm folded into it (quant.algorithms.fold)
        q.folded_batchnorm = str(info["config"]["folded_batchnorm"])
    return q


def _build_empty(info: dict) -> nn.Module:
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
    if t == "Conv3d" or t in TRANSPOSED:
        return build_conv(t, shape, info, wargs, aargs)
    if t in RECURRENT:
        if wargs is None:
            raise ValueError(f"a quantized {t} needs quantized weights")
        return build_recurrent(t, info, wargs, aargs)
    raise ValueError(f"unknown quantized layer type {t!r}")


__all__ = ["ActQuant", "make_observer", "QuantLinear", "QuantConv1d", "QuantConv2d", "QuantEmbedding",
           "QuantizedWeightMixin", "qparam_shape", "QUANT_CLASSES", "float_layer_type",
           "quantize_module", "build_empty", "rotation_block_for", "tensors_for_save", "serialized_size",
           "QuantConv3d", "QuantConvTranspose1d", "QuantConvTranspose2d", "QuantConvTranspose3d", "QuantLSTM",
           "QuantGRU", "QuantMatrix", "stored_weight_shape", "QuantMultiheadAttention", "unfuse", "unfused_modules",
           "restore_unfused"]
