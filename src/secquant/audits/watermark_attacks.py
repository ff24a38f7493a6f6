"""Attacks on a watermarked quantized model, as someone holding only the quantized model could mount them: noise
on the integer codes, Gaussian noise or pruning on the dequantized float weights, one epoch of fine-tuning
(re-quantization is `secquant.quantize` on the attacked float model). The watermark tests and `bench/watermark.py`
measure the mark against the same functions."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..quant.algorithms.training import fit
from ..security.watermark import _store_codes, dequantized_float, int_layers


def code_noise(module: nn.Module, fraction: float, seed: int) -> nn.Module:
    """A copy with a random `fraction` of every layer's integer codes moved by +-1 (clamped to the code range)."""
    m = copy.deepcopy(module)
    g = torch.Generator().manual_seed(seed)
    for layer in int_layers(m).values():
        c = layer.weight_codes().to(torch.int64)
        hit = torch.rand(c.shape, generator=g) < fraction
        step = torch.where(torch.rand(c.shape, generator=g) < 0.5, -1, 1)
        _store_codes(layer, torch.where(hit, (c + step).clamp(0, 2 ** layer.weight_args.bits - 1), c))
    return m


@torch.no_grad()
def gaussian_noise(float_module: nn.Module, qmodule: nn.Module, sigma: float, seed: int) -> nn.Module:
    """The dequantized float model plus N(0, (sigma x the layer's weight RMS)^2) on every quantized weight."""
    f = dequantized_float(float_module, qmodule)
    g = torch.Generator().manual_seed(seed)
    for name in int_layers(qmodule):
        w = f.get_submodule(name).weight
        w.add_(sigma * w.pow(2).mean().sqrt() * torch.randn(w.shape, generator=g))
    return f


@torch.no_grad()
def prune(float_module: nn.Module, qmodule: nn.Module, fraction: float) -> nn.Module:
    """The dequantized float model with the `fraction` smallest-magnitude weights of every quantized layer zeroed."""
    f = dequantized_float(float_module, qmodule)
    for name in int_layers(qmodule):
        w = f.get_submodule(name).weight
        k = max(1, int(fraction * w.numel()))
        cut = w.abs().reshape(-1).kthvalue(k).values
        w.masked_fill_(w.abs() <= cut, 0.0)
    return f


def finetune(f: nn.Module, x: torch.Tensor, y: torch.Tensor, opt: str, lr: float, seed: int) -> nn.Module:
    """One epoch of cross-entropy training of a classifier on (x, y), batches of 64 in a seeded order (SGD with
    momentum 0.9, or Adam)."""
    params = list(f.parameters())
    for p in params:
        p.requires_grad_(True)
    o = torch.optim.SGD(params, lr=lr, momentum=0.9) if opt == "sgd" else torch.optim.Adam(params, lr=lr)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))

    def batches():
        return ((x[b], y[b]) for b in perm.split(64))

    def step(xb, yb):
        o.zero_grad()
        loss = torch.nn.functional.cross_entropy(f(xb), yb)
        loss.backward()
        o.step()
        return float(loss)

    fit(f, batches, 1, step)
    return f
