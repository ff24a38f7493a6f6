"""A loaded float model plus what secquant needs to calibrate, evaluate and rebuild it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn


@dataclass
class ModelHandle:
    """The float module and the model-specific glue around it.

    `spec` is how the model was named (e.g. `builtin:digits`); `rebuild` is the manifest entry
    that says how to re-create the float architecture without any pickle.
    """

    module: nn.Module
    kind: Literal["classifier", "encoder"]
    spec: str
    rebuild: dict[str, Any]
    adapter: "Adapter"
    arch_files: dict[str, Path] = field(default_factory=dict)  # artifact-relative name -> source file

    def run(self, module: nn.Module, batch: Any) -> torch.Tensor:
        return self.adapter.run(module, batch)


class Adapter:
    """How to feed batches to a family of models and which data they have built in."""

    kind: Literal["classifier", "encoder"] = "classifier"
    has_builtin_data: bool = False  # calibration/evaluation data to use when the user gives none

    def run(self, module: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def calibration_batches(self, source: str | Path | None, num_samples: int, batch_size: int) -> Iterator[Any]:
        raise NotImplementedError

    def eval_batches(self, source: str | Path | None, batch_size: int) -> Iterator[tuple[Any, Any]]:
        """(inputs, labels) for classifiers; (inputs, None) for encoders."""
        raise NotImplementedError
