"""Factories for the factory-workflow tests (importable as `input_factory` from tests/models): models whose
input shape or dtype secquant must be told or must infer."""

from __future__ import annotations

import torch
from torch import nn


class TokenClassifier(nn.Module):
    """Token ids [batch, 8] (int64) -> 3 class scores; its first layer is an nn.Embedding."""

    sample_shape = (8,)

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(50, 16)
        self.fc1 = nn.Linear(16, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(self.emb(ids).mean(1))))


class CountsMLP(nn.Module):
    """Integer counts [batch, 6] (int32, said by its `sample_dtype` attribute) -> 3 class scores."""

    sample_shape = (6,)
    sample_dtype = "int32"

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x.float())))


def tokens() -> nn.Module:
    return TokenClassifier()


def counts() -> nn.Module:
    return CountsMLP()


def no_shape() -> nn.Module:
    """A 6-feature MLP with no `sample_shape` attribute: the caller gives --sample-shape."""
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 3))
