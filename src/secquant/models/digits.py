"""builtin:digits: a small CNN trained in seconds on scikit-learn's digits (offline, seeded).

Members (its training split) and non-members (held out) are fixed, so privacy audits can
ask whether a quantized model leaks membership more than the float one. The trained
weights are cached as safetensors after the first run. The data is loaded only when a
caller reads it (`LazySplits`): a run that needs none (`--calib synthetic`, weight-only
presets) does not open it once the weights are cached.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import ModelHandle
from .classifier import BUILTIN_ARCHITECTURES, TensorClassifierAdapter

SAMPLE_SHAPE = (1, 8, 8)
CACHE_NAME = "digits-cnn-v1.safetensors"


class DigitsCNN(nn.Module):
    """Conv-BN-ReLU x2, max-pool, two linear layers; ~40k parameters, ~98% accuracy."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


@lru_cache(maxsize=1)
def splits() -> dict[str, torch.Tensor]:
    """Fixed member/non-member split (50/50, stratified, seed 0), pixels scaled to [0, 1]."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, *SAMPLE_SHAPE) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=0.5, random_state=0, stratify=d.target)
    tr, te = torch.as_tensor(tr), torch.as_tensor(te)
    return {"train_x": x[tr], "train_y": y[tr], "test_x": x[te], "test_y": y[te]}


class LazySplits(Mapping):
    """`splits()` behind a mapping that loads it on first access, so holding a handle reads no data."""

    def __getitem__(self, key: str) -> torch.Tensor:
        return splits()[key]

    def __iter__(self):
        return iter(splits())

    def __len__(self) -> int:
        return len(splits())


def cache_dir() -> Path:
    return Path(os.environ.get("SECQUANT_CACHE", Path.home() / ".cache" / "secquant"))


def train_digits(epochs: int = 40, seed: int = 0) -> DigitsCNN:
    """Deterministic training on the member split (full batch order fixed by the seed)."""
    from ..quant.algorithms.training import fit, gradient_step, shuffled

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitsCNN()
    data = splits()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    fit(model, shuffled(data["train_x"], data["train_y"], 64, g), epochs, gradient_step(model, opt))
    return model


def pretrained_digits() -> DigitsCNN:
    """The cached trained model (trained and cached on first use; the cache is safetensors)."""
    path = cache_dir() / CACHE_NAME
    model = DigitsCNN()
    if path.is_file():
        try:
            model.load_state_dict(load_file(str(path)))
            return model.eval()
        except Exception:
            pass  # a corrupt cache is rebuilt below, never trusted
    model = train_digits()
    from ..artifact.fsutil import atomic_file

    with atomic_file(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    return model


def load_builtin_digits() -> ModelHandle:
    return ModelHandle(module=pretrained_digits(), spec="builtin:digits", rebuild={"loader": "builtin", "name": "digits"},
                       adapter=TensorClassifierAdapter(SAMPLE_SHAPE, LazySplits()))


def digits_architecture() -> tuple[nn.Module, TensorClassifierAdapter]:
    """The float architecture (untrained) and its adapter, for rebuilding an artifact made from builtin:digits."""
    return DigitsCNN().eval(), TensorClassifierAdapter(SAMPLE_SHAPE, LazySplits())


BUILTIN_ARCHITECTURES["digits"] = digits_architecture
