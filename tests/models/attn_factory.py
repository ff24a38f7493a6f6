"""PyTorch-native transformer classifiers for `package.module:factory` tests (importable as `attn_factory`)."""

from __future__ import annotations

import torch
from torch import nn

SEQ, FEATURES, CLASSES = 8, 12, 3


class EncoderClassifier(nn.Module):
    """[seq, features] -> class scores: a feature projection, two `nn.TransformerEncoderLayer`s in an
    `nn.TransformerEncoder`, mean pooling and a Linear head."""

    sample_shape = (SEQ, FEATURES)

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, 32)
        layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2)
        self.head = nn.Linear(32, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(x)).mean(1))


class DecoderClassifier(nn.Module):
    """[seq, features] -> class scores: learned queries attend (causally) to themselves and to the projected
    input through two pre-norm `nn.TransformerDecoderLayer`s (GELU), then a Linear head on their mean."""

    sample_shape = (SEQ, FEATURES)

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(FEATURES, 32)
        self.queries = nn.Parameter(torch.randn(1, 4, 32) * 0.5)
        layer = nn.TransformerDecoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True,
                                           activation="gelu")
        self.decoder = nn.TransformerDecoder(layer, 2)
        self.head = nn.Linear(32, CLASSES)
        self.register_buffer("causal", torch.ones(4, 4, dtype=torch.bool).triu(1), persistent=False)  # True: hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tgt = self.queries.expand(x.shape[0], -1, -1)
        return self.head(self.decoder(tgt, self.embed(x), tgt_mask=self.causal).mean(1))


def encoder_classifier() -> nn.Module:
    return EncoderClassifier()


def decoder_classifier() -> nn.Module:
    return DecoderClassifier()
