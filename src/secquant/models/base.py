"""A loaded float model plus what secquant needs to calibrate, evaluate, export, serve and rebuild it.

Everything that depends on the kind of model (a tensor classifier, a sentence encoder, ...) lives in one
`Adapter` subclass per kind; the rest of secquant asks the adapter and never checks the kind. A new kind
is a subclass registered in `models.ADAPTERS`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from ..errors import ModelError


@dataclass
class GraphIO:
    """How an adapter's batch becomes a traced graph's inputs and output (names, dynamic axes)."""

    names: list[str]
    args: tuple
    kwargs: dict[str, Any] | None
    output: str
    axes: dict[str, dict[int, str]]


class Adapter:
    """How to feed a family of models: batches, data, metric, export and serving glue."""

    kind: ClassVar[str] = "model"  # recorded in the manifest; models.ADAPTERS[kind] rebuilds it
    loaders: ClassVar[tuple[str, ...]] = ()  # manifest `rebuild.loader` values this kind rebuilds
    task: ClassVar[str] = "predict"  # what the server offers: "predict" (class scores), "embed" or "generate"
    labelled: ClassVar[bool] = False  # outputs are class scores, so accuracy on labels is its metric
    has_builtin_data: bool = False  # calibration/evaluation data to use when the user gives none
    tuning_samples: ClassVar[int] = 64  # evaluation samples the mixed-precision search measures sensitivity on

    # -- data --------------------------------------------------------------------------------------
    def run(self, module: nn.Module, batch: Any) -> torch.Tensor:
        raise NotImplementedError

    def calibration_batches(self, source: str | Path | None, num_samples: int, batch_size: int) -> Iterator[Any]:
        raise NotImplementedError

    def eval_batches(self, source: str | Path | None, batch_size: int) -> Iterator[tuple[Any, Any]]:
        """(inputs, labels) batches; labels are None for models scored by cosine to the float outputs."""
        raise NotImplementedError

    def scorer(self) -> Any:
        """What scores evaluation outputs when accuracy or cosine is not the metric: an object with
        `add(inputs, quantized_outputs, float_outputs)` and `result()` (a dict with metric, value, float_value,
        ...); None for accuracy (labelled data) or mean cosine to the float outputs."""
        return None

    def generate(self, module: nn.Module, prompt: str, **options: Any) -> dict[str, Any]:
        """Text continuing `prompt` (models whose task is "generate")."""
        raise ModelError(f"this model is a {self.kind}: it does not generate text")

    def encode(self, texts: list[str]) -> Any:
        """A batch from raw texts (text models)."""
        raise ModelError(f"this model is a {self.kind}: it takes tensors, not texts")

    def train_set(self, source: str | Path | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, labels) to retrain on (labelled models)."""
        raise ModelError(f"retraining needs a labelled training set and a classification loss; this model is a "
                         f"{self.kind}: use `secquant quantize` (post-training quantization) for it")

    def architecture_files(self, directory: Path) -> dict[str, Path]:
        """Files beside the weights that rebuild the float architecture (copied into artifacts)."""
        return {}

    def write_builtin_calibration(self, directory: Path, n: int) -> Path:
        """The first `n` samples of the built-in calibration data as a file `--calib` reads."""
        raise ModelError(f"this {self.kind} has no built-in calibration data")

    # -- data-free inputs ----------------------------------------------------------------------------
    def synthetic_batches(self, module: nn.Module, n: int, seed: int = 0) -> Callable[[int], Iterator[Any]]:
        """`n` public calibration samples made without reading data; call the result with a batch size."""
        raise ModelError(f"secquant cannot make data-free calibration inputs for a {self.kind}: pass --calib FILE")

    synthetic_description: ClassVar[str] = "synthetic"

    def synthetic_prior(self, spec: str) -> str:
        """Where the data-free inputs' information comes from, for the privacy ledger."""
        return self.synthetic_description

    # -- realistic inputs (integrity canaries) ---------------------------------------------------------
    takes_text: ClassVar[bool] = False  # inputs are texts (tokenized by the adapter), read row by row of a vocabulary

    def realistic_inputs(self, rng: random.Random, n: int) -> list[Any]:
        """Up to `n` realistic single inputs (never the held-out evaluation data), in `rng`'s order; `collate`
        makes a batch of them. [] when the model has none to offer."""
        return []

    def collate(self, items: list[Any]) -> Any:
        raise NotImplementedError

    def vocabulary_ids(self) -> list[int]:
        """The token ids an embedding table holds (text models), special tokens left out."""
        return []

    def frequent_token_ids(self, n: int) -> list[int]:
        """The `n` most frequent tokens of realistic text (text models)."""
        return []

    def token_rows(self, ids: list[int], length: int) -> Any:
        """A batch of rows of `length` tokens holding `ids` in order (text models)."""
        raise NotImplementedError

    # -- export and serving --------------------------------------------------------------------------
    def sample_batch(self) -> Any:
        """A small batch to trace the model with (and to run integrity canaries on)."""
        raise ModelError(f"this {self.kind} has no sample input: pass sample_input=<a batch>")

    graph_style: ClassVar[str] = "module"  # how the ONNX exporter builds the graph (runtime.onnx.export.GRAPH_BUILDERS)

    def graph_io(self, sample: Any) -> GraphIO:
        raise NotImplementedError

    def feeds(self, batch: Any, input_names: list[str]) -> dict[str, np.ndarray]:
        """ONNX Runtime feeds for a batch."""
        raise NotImplementedError

    @classmethod
    def for_artifact(cls, directory: Path, rebuild: dict[str, Any]) -> Adapter:
        """The adapter for an artifact directory of this kind, without its model."""
        raise NotImplementedError


@dataclass
class ModelHandle:
    """The float module and the model-specific glue around it.

    `spec` is how the model was named (e.g. `builtin:digits`); `rebuild` is the manifest entry
    that says how to re-create the float architecture without any pickle.
    """

    module: nn.Module
    spec: str
    rebuild: dict[str, Any]
    adapter: Adapter
    arch_files: dict[str, Path] = field(default_factory=dict)  # artifact-relative name -> source file

    @property
    def kind(self) -> str:
        return self.adapter.kind

    def run(self, module: nn.Module, batch: Any) -> torch.Tensor:
        return self.adapter.run(module, batch)
