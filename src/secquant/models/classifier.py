"""Tensor classifiers: models fed one float tensor per batch, returning class scores (logits).

The adapter for builtin:digits, `package.module:factory` models and Python modules: data from a
built-in split or a tensor file, accuracy as the metric, ZeroQ data-free inputs from BatchNorm
statistics, one `input` tensor in ONNX graphs.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CalibrationError, ModelError
from .base import Adapter, GraphIO, ModelHandle
from .data import input_tensor, read_tensors, write_tensors
from .inputs import (DEFAULT_DTYPE, MAX_SAMPLE_ELEMENTS, check_sample_shape, dtype_name, id_bound, infer_sample_dtype,
                     made_up_inputs)

ZEROQ_STEPS = 200
# name -> () -> (untrained float architecture, adapter): the built-in classifiers register here (models/digits.py);
# an artifact naming `builtin` is rebuilt only from this fixed table
BUILTIN_ARCHITECTURES: dict[str, Callable[[], tuple[nn.Module, "TensorClassifierAdapter"]]] = {}  # ZeroQ optimization steps for data-free inputs: within 0.2 points of 500 on digits


class TensorClassifierAdapter(Adapter):
    """Models fed one float tensor, returning logits; data from the built-in set or a file."""

    kind = "classifier"
    loaders = ("builtin", "factory", "module")
    task = "predict"
    labelled = True
    tuning_samples = 256
    synthetic_description = "synthetic (ZeroQ: inputs optimized to match BatchNorm running statistics)"

    def __init__(self, sample_shape: tuple[int, ...] | None, builtin: Mapping[str, torch.Tensor] | None = None,
                 sample_dtype: str = DEFAULT_DTYPE, id_high: int | None = None) -> None:
        self.sample_shape = sample_shape
        self.builtin = builtin
        self.sample_dtype = sample_dtype  # models.inputs.SAMPLE_DTYPES: int64 for token-id models
        self.id_high = id_high  # integer inputs: exclusive bound (the smallest embedding table), None if unknown

    @classmethod
    def for_module(cls, module: nn.Module, rebuild: dict[str, Any]) -> "TensorClassifierAdapter":
        """The adapter of a (rebuilt) float module: input shape and dtype as the manifest records them (an
        older manifest without a dtype: as the module shows it)."""
        dtype = sample_dtype_of(rebuild) or infer_sample_dtype(module)
        return cls(sample_shape_of(rebuild), sample_dtype=dtype, id_high=id_bound(module))

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

    def write_builtin_calibration(self, directory: Path, n: int) -> Path:
        if self.builtin is None:
            return super().write_builtin_calibration(directory, n)
        return write_tensors(self.builtin["train_x"][:n], Path(directory) / "calibration.safetensors")

    def synthetic_batches(self, module: nn.Module, n: int, seed: int = 0) -> Callable[[int], Iterator[Any]]:
        from ..quant.algorithms.datafree import synthesize_from_batchnorm

        if not self.sample_shape:
            raise CalibrationError("synthetic (ZeroQ) calibration needs a tensor model with a known input shape "
                                   "(a `sample_shape` attribute, or --sample-shape): pass --calib FILE instead")
        if self.sample_dtype != DEFAULT_DTYPE:
            raise CalibrationError(f"synthetic (ZeroQ) inputs are optimized floats, and this model takes "
                                   f"{self.sample_dtype} inputs: pass --calib FILE instead")
        x = synthesize_from_batchnorm(module, n, tuple(self.sample_shape), ZEROQ_STEPS, seed)
        return lambda batch_size: (x[i:i + batch_size] for i in range(0, len(x), batch_size))

    def synthetic_prior(self, spec: str) -> str:
        who = ("the member split of builtin:digits, trained without differential privacy" if spec == "builtin:digits"
               else "whatever data the float model was trained on, without differential privacy as far as secquant "
                    "knows")
        return (f"{self.synthetic_description}; no data file is read, but the BatchNorm running statistics the "
                f"inputs are distilled from summarize the float model's training data ({who}). This ledger covers "
                "the calibration data only: the prior, like the float model itself, is not independent of that "
                "training data")

    def realistic_inputs(self, rng, n: int) -> list[Any]:
        if self.builtin is not None:
            x = self.builtin["train_x"]  # the training split: accuracy is measured on the held-out one
            order = list(range(len(x)))
            rng.shuffle(order)
            return list(x[order[:n]])
        if not self.sample_shape:
            return []
        gen = torch.Generator().manual_seed(rng.getrandbits(63))
        return list(made_up_inputs(n, self.sample_shape, self.sample_dtype, self.id_high, gen, normal=True))

    def collate(self, items: list[Any]) -> torch.Tensor:
        return torch.stack(items)

    def sample_batch(self) -> torch.Tensor:
        if not self.sample_shape:
            raise ModelError("this classifier records no input shape: pass --sample-shape (the shape of one sample "
                             "without the batch dimension; API: sample_shape=, or sample_input=<a batch>), or give "
                             "the model a `sample_shape` attribute, or pass --sample-shape to quantize to record it")
        return made_up_inputs(2, self.sample_shape, self.sample_dtype, self.id_high, torch.Generator().manual_seed(0))

    def graph_io(self, sample: torch.Tensor) -> GraphIO:
        return GraphIO(["input"], (sample,), None, "logits", {"input": {0: "batch"}, "logits": {0: "batch"}})

    def feeds(self, batch: Any, input_names: list[str]) -> dict[str, np.ndarray]:
        from ..errors import SecquantError

        if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], (torch.Tensor, np.ndarray)):
            batch = batch[0]  # (inputs, labels) pairs as eval batches come
        if isinstance(batch, Mapping):
            raise SecquantError("a classifier runs one input tensor, not a dict")
        arr = batch.detach().cpu().numpy() if isinstance(batch, torch.Tensor) else np.asarray(batch)
        return {input_names[0]: np.ascontiguousarray(arr, dtype=np.dtype(self.sample_dtype))}

    @classmethod
    def for_artifact(cls, directory: Path, rebuild: dict[str, Any]) -> "TensorClassifierAdapter":
        if rebuild.get("loader") == "builtin" and rebuild.get("name") in BUILTIN_ARCHITECTURES:
            return BUILTIN_ARCHITECTURES["digits"]()[1]
        return cls(sample_shape_of(rebuild), sample_dtype=sample_dtype_of(rebuild) or DEFAULT_DTYPE)

    @classmethod
    def rebuild(cls, d: Path, rebuild: dict[str, Any], spec: str, model: nn.Module | None,
                factory: str | None) -> tuple[nn.Module, "TensorClassifierAdapter"]:
        """The float architecture an artifact names, and its adapter: a built-in from a fixed table, a factory
        only when the caller confirms the same name, a Python module only when the caller passes one."""
        from ..errors import ArtifactError

        loader = rebuild.get("loader")
        if model is not None:
            return model, cls.for_module(model, rebuild)
        if loader == "builtin" and rebuild.get("name") in BUILTIN_ARCHITECTURES:
            return BUILTIN_ARCHITECTURES[rebuild["name"]]()
        if loader == "factory":
            if factory != rebuild.get("factory"):
                raise ArtifactError(
                    f"this artifact is rebuilt by calling {str(rebuild.get('factory'))[:120]!r}; secquant runs no "
                    "code named by a file unless you confirm it: pass factory=... with that name (CLI: --factory)")
            from .factory import call_factory

            module = call_factory(factory).eval()
            return module, cls.for_module(module, rebuild)
        if loader == "module":
            raise ArtifactError("this artifact was made from a Python nn.Module: pass model=<an instance of the same "
                                "architecture> to secquant.load")
        raise ArtifactError(f"unknown model loader {str(loader)[:40]!r} for a {cls.kind} in the manifest")


def sample_shape_of(rebuild: dict[str, Any]) -> tuple[int, ...] | None:
    """The per-sample input shape a manifest records, bounded (the server allocates canaries from it)."""
    from ..errors import ArtifactError

    shape = rebuild.get("sample_shape")
    if shape is None:
        return None
    if not isinstance(shape, list) or not 1 <= len(shape) <= 8 or \
            not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 2**20 for n in shape) or \
            int(np.prod(shape)) > MAX_SAMPLE_ELEMENTS:
        raise ArtifactError(f"the manifest's sample_shape {str(shape)[:80]} is not a plausible input shape "
                            f"(1 to 8 positive sizes, at most {MAX_SAMPLE_ELEMENTS} elements)")
    return tuple(shape)


def sample_dtype_of(rebuild: dict[str, Any]) -> str | None:
    """The input dtype a manifest records (None: not recorded, as in artifacts made before it was)."""
    from ..errors import ArtifactError

    dtype = rebuild.get("sample_dtype")
    if dtype is None:
        return None
    try:
        return dtype_name(dtype)
    except ModelError:
        raise ArtifactError(f"the manifest's sample_dtype {str(dtype)[:40]!r} is not one secquant feeds") from None


def module_handle(model: nn.Module, spec: str, rebuild: dict[str, Any], sample_shape: Any = None,
                  sample_dtype: Any = None) -> ModelHandle:
    """A tensor classifier handle for a float module: its input shape is `sample_shape` (else the module's
    `sample_shape` attribute) and its input dtype `sample_dtype` (else models.inputs.infer_sample_dtype);
    both are recorded in `rebuild` (the manifest) for the commands that later rebuild it."""
    given = check_sample_shape(sample_shape, "--sample-shape")
    shape = given or check_sample_shape(getattr(model, "sample_shape", None), f"{spec}'s sample_shape attribute")
    dtype = infer_sample_dtype(model, sample_dtype)
    rebuild = {**rebuild, "sample_shape": list(shape) if shape else None, "sample_dtype": dtype}
    adapter = TensorClassifierAdapter(shape, sample_dtype=dtype, id_high=id_bound(model))
    return ModelHandle(module=model.eval(), spec=spec, rebuild=rebuild, adapter=adapter)


def load_factory(spec: str, weights: str | None, sample_shape: Any = None, sample_dtype: Any = None) -> ModelHandle:
    """A `package.module:factory` model (called with no arguments, the caller's explicit choice) with the float
    weights of `weights`; a tensor classifier whose input shape and dtype are as `module_handle` says."""
    from .checkpoint import load_into, load_state_dict
    from .factory import call_factory

    check_sample_shape(sample_shape, "--sample-shape")  # a bad shape or dtype fails before the factory runs
    if sample_dtype is not None:
        dtype_name(sample_dtype, "--sample-dtype")
    model = call_factory(spec)
    if weights is not None:
        load_into(model, load_state_dict(weights), str(weights), spec)
    return module_handle(model, spec, {"loader": "factory", "factory": spec}, sample_shape, sample_dtype)
