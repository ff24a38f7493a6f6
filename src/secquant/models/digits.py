"""builtin:digits: a small CNN trained in seconds on scikit-learn's digits (offline, seeded).

Members (its training split) and non-members (held out) are fixed, so privacy audits can
ask whether a quantized model leaks membership more than the float one. The trained
weights are cached as safetensors after the first run. The data is loaded only when a
caller reads it (`LazySplits`): a run that needs none (`--calib synthetic`, weight-only
presets) does not open it once the weights are cached.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .base import Adapter, ModelHandle
from .data import input_tensor, read_tensors

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


class TensorClassifierAdapter(Adapter):
    """Models fed one float tensor, returning logits; data from the built-in set or a file."""

    kind = "classifier"

    def __init__(self, sample_shape: tuple[int, ...] | None, builtin: Mapping[str, torch.Tensor] | None = None) -> None:
        self.sample_shape = sample_shape
        self.builtin = builtin

    @property
    def has_builtin_data(self) -> bool:
        return self.builtin is not None

    def run(self, module: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return module(batch)

    def _file_inputs(self, source) -> tuple[torch.Tensor, torch.Tensor | None]:
        data = read_tensors(source)
        x = input_tensor(data, source, self.sample_shape)
        return x, data.get("labels")

    def calibration_batches(self, source, num_samples: int, batch_size: int) -> Iterator[torch.Tensor]:
        if source is not None:
            x, _ = self._file_inputs(source)
        elif self.builtin is not None:
            x = self.builtin["train_x"]
        else:
            from ..errors import CalibrationError
            raise CalibrationError("this model has no built-in data: pass --calib FILE (.safetensors or .npy)")
        x = x[:num_samples]
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size]

    def train_set(self, source) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) to train on: the built-in member split, or a file with 'inputs' and 'labels'."""
        from ..errors import CalibrationError
        if source is not None:
            x, y = self._file_inputs(source)
            if y is None:
                raise CalibrationError(f"{source}: training needs a 'labels' tensor next to 'inputs'")
            if len(y) != len(x):
                raise CalibrationError(f"{source}: {len(x)} inputs but {len(y)} labels")
            return x, y.long()
        if self.builtin is not None:
            return self.builtin["train_x"], self.builtin["train_y"]
        raise CalibrationError("this model has no built-in training set: pass --train FILE.safetensors "
                               "with 'inputs' and 'labels'")

    def eval_batches(self, source, batch_size: int):
        if source is not None:
            x, y = self._file_inputs(source)
        elif self.builtin is not None:
            x, y = self.builtin["test_x"], self.builtin["test_y"]
        else:
            from ..errors import CalibrationError
            raise CalibrationError("this model has no built-in data: pass --data FILE (.safetensors with 'inputs' [and 'labels'])")
        for i in range(0, len(x), batch_size):
            yield x[i:i + batch_size], (None if y is None else y[i:i + batch_size])


def load_builtin_digits() -> ModelHandle:
    return ModelHandle(
        module=pretrained_digits(), kind="classifier", spec="builtin:digits",
        rebuild={"loader": "builtin", "name": "digits"},
        adapter=TensorClassifierAdapter(SAMPLE_SHAPE, LazySplits()),
    )
