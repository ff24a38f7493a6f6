"""Fixtures for private inference: a tiny hand-made quantized MLP whose weights sit at the ends of the
code range (the worst case for accumulator growth), and the digits w8a8 backend."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from secquant.quant.modules import QuantLinear
from secquant.quant.schema import QuantArgs

W8 = QuantArgs(bits=8, symmetric=True, granularity="channel", axis=0)
A8 = QuantArgs(bits=8, symmetric=False, granularity="tensor", observer="minmax")


def quant_linear(codes: torch.Tensor, scale: float, in_scale: float, bias: torch.Tensor | None = None,
                 smooth: torch.Tensor | None = None) -> QuantLinear:
    """A QuantLinear with the given signed int8 weight codes and static uint8 input qparams (zero point 0)."""
    out_f, in_f = codes.shape
    q = QuantLinear(in_f, out_f, bias is not None, W8, A8, smooth=smooth is not None)
    q.set_quantized(codes.to(torch.int64), torch.full((out_f,), scale), torch.zeros(out_f, dtype=torch.int64))
    if bias is not None:
        q.bias.data.copy_(bias)
    if smooth is not None:
        q.smooth_scale.copy_(smooth)
    q.input_quant.scale.fill_(in_scale)
    q.input_quant.zero_point.zero_()
    q.input_quant.calibrated = True
    return q


def hostile_mlp() -> nn.Sequential:
    """64 -> 16 -> 4 with every weight at +127 or -128: accumulators reach 64 * 128 * 255 (the bound)."""
    g = torch.Generator().manual_seed(0)
    c1 = torch.where(torch.rand(16, 64, generator=g) < 0.5, torch.tensor(-128), torch.tensor(127))
    c2 = torch.where(torch.rand(4, 16, generator=g) < 0.5, torch.tensor(-128), torch.tensor(127))
    l1 = quant_linear(c1, 0.02, 1 / 255, bias=torch.randn(16, generator=g),
                      smooth=torch.rand(64, generator=g) + 0.5)
    l2 = quant_linear(c2, 0.03, 0.05, bias=torch.randn(4, generator=g))
    return nn.Sequential(nn.Flatten(), l1, nn.ReLU(), l2).eval()


@pytest.fixture(scope="module")
def digits_w8a8(digits_artifact):
    import secquant

    return secquant.load(digits_artifact("w8a8"), allow_unsealed=True)
