"""Quantized replacements for Linear, Conv1d/2d, Embedding (and Hugging Face Conv1D)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..schema import QuantArgs
from ..primitives import is_rotatable, rotate, rotate_hessian, rotation_signs, unrotate
from ..primitives.rotation import hadamard
from .activation import ActQuant
from .weight import QuantizedWeightMixin


class _QuantLayer(QuantizedWeightMixin, nn.Module):
    """Common init: quantized weight, optional float bias, optional input quantizer."""

    layer_type = "base"

    def __init__(self, weight_shape, has_bias: bool, wargs: QuantArgs | None,
                 aargs: QuantArgs | None, bias_shape: int) -> None:
        nn.Module.__init__(self)
        self._init_weight(tuple(weight_shape), wargs)
        self.bias = nn.Parameter(torch.zeros(bias_shape), requires_grad=False) if has_bias else None
        self.input_quant = ActQuant(aargs) if aargs is not None else None

    def _in(self, x: torch.Tensor) -> torch.Tensor:
        return self.input_quant(x) if self.input_quant is not None else x

    def config(self) -> dict:
        """Constructor arguments beyond the weight, recorded in the manifest to rebuild the layer."""
        return {}

    def layer_info(self, source_type: str) -> dict:
        return {
            "type": self.layer_type,
            "source_type": source_type,
            "weight": self.weight_info(),
            "activation": None if self.input_quant is None else self.input_quant.args.model_dump(),
            "bias": self.bias is not None,
            "config": self.config(),
        }


class QuantLinear(_QuantLayer):
    """y = Q_a((x / s) R) @ Q_w(W s R)^T + b, with s the optional per-input-channel smoothing scale and
    R the optional randomized block-Hadamard rotation (both exact in float)."""

    layer_type = "Linear"
    derived_tensors = ("_w_cache", "rotation_hadamard")

    def __init__(self, in_features: int, out_features: int, bias: bool,
                 wargs: QuantArgs | None, aargs: QuantArgs | None, smooth: bool = False,
                 rotation: int | None = None) -> None:
        super().__init__((out_features, in_features), bias, wargs, aargs, out_features)
        self.in_features, self.out_features = in_features, out_features
        self.smooth_alpha: float | None = None
        if smooth:
            self.register_buffer("smooth_scale", torch.ones(in_features))
        else:
            self.smooth_scale = None
        if rotation is not None and not is_rotatable(in_features, rotation):
            raise ValueError(f"a rotation block of {rotation} does not divide {in_features} input features "
                             "(it must be a power of two that does)")
        self.rotation_block = rotation
        if rotation is not None:
            self.register_buffer("rotation_signs", torch.ones(in_features))
            # the layer's own copy of the Hadamard block its forward multiplies by (not the process-wide
            # cached one), so the integrity guard, which covers what the module holds, covers it too
            self.register_buffer("rotation_hadamard", hadamard(rotation).clone(), persistent=False)
        else:
            self.rotation_signs = None
            self.rotation_hadamard = None

    @classmethod
    def from_float(cls, mod: nn.Module, wargs, aargs, prep=None, rotation=None) -> "QuantLinear":
        """`prep` (from the scale search) has .scale, .alpha and optional .w_range = (lo, hi) per granule
        (of the weight as stored: scaled and rotated); `rotation` is the recipe's Rotation or None."""
        if type(mod).__name__ == "Conv1D":  # Hugging Face GPT-2 style: weight is [in, out]
            w = mod.weight.detach().t()
        else:
            w = mod.weight.detach()
        block = rotation_block_for(rotation, w.shape[1], wargs)
        q = cls(w.shape[1], w.shape[0], mod.bias is not None, wargs, aargs, smooth=prep is not None, rotation=block)
        if prep is not None:
            q.smooth_scale.copy_(prep.scale)
            q.smooth_alpha = prep.alpha
        if block is not None:
            q.rotation_signs.copy_(rotation_signs(w.shape[1], rotation.seed))
        q.set_weight(q.weight_space(w), None if prep is None else prep.w_range)
        if mod.bias is not None:
            q.bias.data.copy_(mod.bias.detach().float())
        return q

    def input_space(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's input as its stored weight expects it: x / s, then rotated (x D B, as
        primitives.rotate computes it, with the layer's own Hadamard block B)."""
        if self.smooth_scale is not None:
            x = x / self.smooth_scale
        if self.rotation_block is not None:
            b = self.rotation_block
            x = x * self.rotation_signs.to(x.dtype)
            x = (x.reshape(*x.shape[:-1], x.shape[-1] // b, b) @ self.rotation_hadamard.to(x.dtype)).reshape(x.shape)
        return x

    def refresh_derived(self) -> None:
        """Recompute the dequantized-weight cache and the Hadamard block from what defines them."""
        if self.rotation_block is not None:
            self.rotation_hadamard.copy_(hadamard(self.rotation_block))
        super().refresh_derived()

    def weight_space(self, w: torch.Tensor) -> torch.Tensor:
        """A float weight [out, in] mapped to what the codes quantize: W s, then rotated."""
        if self.smooth_scale is not None:
            w = w * self.smooth_scale
        if self.rotation_block is not None:
            w = rotate(w, self.rotation_signs, self.rotation_block)
        return w

    def input_gram(self, G: torch.Tensor) -> torch.Tensor:
        """A Gram matrix X^T Y of raw inputs [in, in] (a GPTQ Hessian) in the space the stored weight
        reads: (X / s R)^T (Y / s R)."""
        if self.smooth_scale is not None:
            s = self.smooth_scale.to(G.dtype)
            G = G / (s[:, None] * s[None, :])
        if self.rotation_block is not None:
            G = rotate_hessian(G, self.rotation_signs, self.rotation_block)
        return G

    def float_weight(self) -> torch.Tensor:
        """The float weight [out, in] the layer computes with (rotation and smoothing undone)."""
        w = super().float_weight()
        if self.rotation_block is not None:
            w = unrotate(w, self.rotation_signs, self.rotation_block)
        if self.smooth_scale is not None:
            w = w / self.smooth_scale
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._in(self.input_space(x)), self.dequantized_weight(), self.bias)

    def config(self) -> dict:
        cfg = {"in_features": self.in_features, "out_features": self.out_features}
        if self.smooth_scale is not None:
            cfg.update(smooth=True, smooth_alpha=self.smooth_alpha)
        if self.rotation_block is not None:
            cfg.update(rotation=self.rotation_block)
        return cfg


def rotation_block_for(rotation, cols: int, wargs: QuantArgs | None) -> int | None:
    """The Hadamard block a Linear with `cols` inputs uses under the recipe's `rotation` (None: not rotated,
    also when its weight stays in float or the block does not divide its width)."""
    if rotation is None or wargs is None or not is_rotatable(cols, rotation.block):
        return None
    return rotation.block


class _QuantConvNd(_QuantLayer):
    dims = 2

    def __init__(self, weight_shape, bias: bool, wargs, aargs, stride, padding, dilation,
                 groups: int, padding_mode: str = "zeros") -> None:
        super().__init__(weight_shape, bias, wargs, aargs, weight_shape[0])
        if padding_mode != "zeros":
            raise ValueError("only padding_mode='zeros' convolutions are supported")
        self.stride, self.padding, self.dilation = tuple(stride), padding, tuple(dilation)
        if not isinstance(self.padding, str):
            self.padding = tuple(self.padding)
        self.groups = groups

    @classmethod
    def from_float(cls, mod: nn.Module, wargs, aargs):
        q = cls(tuple(mod.weight.shape), mod.bias is not None, wargs, aargs, mod.stride, mod.padding,
                mod.dilation, mod.groups, mod.padding_mode)
        q.set_weight(mod.weight)
        if mod.bias is not None:
            q.bias.data.copy_(mod.bias.detach().float())
        return q

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d if self.dims == 2 else F.conv1d
        return conv(self._in(x), self.dequantized_weight(), self.bias, self.stride, self.padding,
                    self.dilation, self.groups)

    def config(self) -> dict:
        return {
            "stride": list(self.stride),
            "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
            "dilation": list(self.dilation),
            "groups": self.groups,
        }


class QuantConv2d(_QuantConvNd):
    layer_type = "Conv2d"
    dims = 2


class QuantConv1d(_QuantConvNd):
    layer_type = "Conv1d"
    dims = 1


class QuantEmbedding(QuantizedWeightMixin, nn.Module):
    """Embedding table quantized per row (or per group along the embedding dimension)."""

    layer_type = "Embedding"

    def __init__(self, num_embeddings: int, embedding_dim: int, wargs: QuantArgs, padding_idx=None) -> None:
        nn.Module.__init__(self)
        self._init_weight((num_embeddings, embedding_dim), wargs)
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.input_quant = None

    @classmethod
    def from_float(cls, mod: nn.Embedding, wargs, aargs=None) -> "QuantEmbedding":
        if mod.max_norm is not None or mod.sparse:
            raise ValueError("embeddings with max_norm or sparse gradients are not supported")
        q = cls(mod.num_embeddings, mod.embedding_dim, wargs, mod.padding_idx)
        q.set_weight(mod.weight)
        return q

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.dequantized_weight(), self.padding_idx)

    def config(self) -> dict:
        return {"num_embeddings": self.num_embeddings, "embedding_dim": self.embedding_dim,
                "padding_idx": self.padding_idx}

    def layer_info(self, source_type: str) -> dict:
        return {"type": self.layer_type, "source_type": source_type, "weight": self.weight_info(),
                "activation": None, "bias": False, "config": self.config()}
