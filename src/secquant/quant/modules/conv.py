"""Quantized Conv3d and transposed convolutions (ConvTranspose1d/2d/3d).

Conv3d reuses the Conv1d/2d layer (layers.py) with F.conv3d. A transposed convolution's torch weight is
[in, out / groups, *k]; it is stored in the layout of the equivalent forward convolution, [out, in / groups, *k],
so that rows are output channels and columns the reduction (in / groups * k) like every other quantized layer
(per-channel scales are per output channel, groups run along the reduction). The forward pass turns the
dequantized weight back into torch's layout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import _QuantConvNd, _QuantLayer


class QuantConv3d(_QuantConvNd):
    layer_type = "Conv3d"
    dims = 3

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(self._in(x), self.dequantized_weight(), self.bias, self.stride, self.padding, self.dilation,
                        self.groups)


def to_conv_layout(w: torch.Tensor, groups: int) -> torch.Tensor:
    """[in, out/g, *k] (torch's transposed-conv weight) -> [out, in/g, *k]."""
    cin, og, k = w.shape[0], w.shape[1], tuple(w.shape[2:])
    return w.reshape(groups, cin // groups, og, *k).transpose(1, 2).reshape(groups * og, cin // groups, *k)


def to_transposed_layout(w: torch.Tensor, groups: int) -> torch.Tensor:
    """[out, in/g, *k] -> [in, out/g, *k] (the inverse of to_conv_layout)."""
    cout, ig, k = w.shape[0], w.shape[1], tuple(w.shape[2:])
    return w.reshape(groups, cout // groups, ig, *k).transpose(1, 2).reshape(groups * ig, cout // groups, *k)


class _QuantConvTransposeNd(_QuantLayer):
    dims = 2
    _fn = staticmethod(F.conv_transpose2d)

    def __init__(self, weight_shape, bias: bool, wargs, aargs, stride, padding, output_padding, dilation,
                 groups: int, padding_mode: str = "zeros") -> None:
        super().__init__(weight_shape, bias, wargs, aargs, weight_shape[0])
        if padding_mode != "zeros":
            raise ValueError("only padding_mode='zeros' transposed convolutions are supported")
        self.stride, self.padding = tuple(stride), tuple(padding)
        self.output_padding, self.dilation = tuple(output_padding), tuple(dilation)
        self.groups = groups

    @classmethod
    def from_float(cls, mod: nn.Module, wargs, aargs):
        w = to_conv_layout(mod.weight.detach(), mod.groups)
        q = cls(tuple(w.shape), mod.bias is not None, wargs, aargs, mod.stride, mod.padding, mod.output_padding,
                mod.dilation, mod.groups, mod.padding_mode)
        q.set_weight(w)
        if mod.bias is not None:
            q.bias.data.copy_(mod.bias.detach().float())
        return q

    def torch_weight(self) -> torch.Tensor:
        """The dequantized weight in torch's transposed-convolution layout [in, out/g, *k]."""
        return to_transposed_layout(self.dequantized_weight(), self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(self._in(x), self.torch_weight(), self.bias, self.stride, self.padding, self.output_padding,
                        self.groups, self.dilation)

    def config(self) -> dict:
        return {"stride": list(self.stride), "padding": list(self.padding),
                "output_padding": list(self.output_padding), "dilation": list(self.dilation), "groups": self.groups}


class QuantConvTranspose1d(_QuantConvTransposeNd):
    layer_type = "ConvTranspose1d"
    dims = 1
    _fn = staticmethod(F.conv_transpose1d)


class QuantConvTranspose2d(_QuantConvTransposeNd):
    layer_type = "ConvTranspose2d"
    dims = 2
    _fn = staticmethod(F.conv_transpose2d)


class QuantConvTranspose3d(_QuantConvTransposeNd):
    layer_type = "ConvTranspose3d"
    dims = 3
    _fn = staticmethod(F.conv_transpose3d)


TRANSPOSED = {"ConvTranspose1d": QuantConvTranspose1d, "ConvTranspose2d": QuantConvTranspose2d,
              "ConvTranspose3d": QuantConvTranspose3d}


def build_conv(t: str, shape: tuple[int, ...], info: dict, wargs, aargs) -> nn.Module:
    """An empty Conv3d / ConvTranspose layer from its manifest entry."""
    cfg = info["config"]
    if t == "Conv3d":
        pad = cfg["padding"] if isinstance(cfg["padding"], str) else tuple(cfg["padding"])
        return QuantConv3d(shape, info["bias"], wargs, aargs, cfg["stride"], pad, cfg["dilation"], cfg["groups"])
    return TRANSPOSED[t](shape, info["bias"], wargs, aargs, cfg["stride"], cfg["padding"], cfg["output_padding"],
                         cfg["dilation"], cfg["groups"])
