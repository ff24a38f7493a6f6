"""Factories for `package.module:factory` tests (importable as `tiny_factory` from tests/models)."""

from __future__ import annotations

import torch
from torch import nn


class Tiny(nn.Module):
    """A 2-layer MLP on 6 features; `sample_shape` tells secquant the per-sample input shape."""

    sample_shape = (6,)

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def tiny() -> nn.Module:
    return Tiny()


def relu_only() -> nn.Module:
    """A model with nothing to quantize."""
    return nn.Sequential(nn.ReLU())
