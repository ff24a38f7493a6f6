"""What one input of a tensor model looks like: its per-sample shape and dtype, and made-up inputs of them.

A factory model says so with its `sample_shape` (and optionally `sample_dtype`) attributes, or the caller
does (`sample_shape=` / `sample_dtype=`, CLI `--sample-shape` / `--sample-dtype`); the manifest records
both so that later commands (export, serve, canaries) can make inputs without the user. A model whose
first layer is an `nn.Embedding` takes integer token ids (int64), so its made-up inputs are ids below
the smallest table's size, never floats.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import ModelError

MAX_SAMPLE_ELEMENTS = 2**24
SAMPLE_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "int64": torch.int64, "int32": torch.int32}
DEFAULT_DTYPE = "float32"


def check_sample_shape(shape: Any, what: str = "sample_shape") -> tuple[int, ...] | None:
    """A per-sample input shape (no batch dimension) as a tuple of 1 to 8 positive sizes; None stays None."""
    if shape is None:
        return None
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    if isinstance(shape, torch.Size):
        shape = tuple(shape)
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 8 or \
            not all(isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= 2**20 for n in shape) or \
            int(np.prod(shape)) > MAX_SAMPLE_ELEMENTS:
        raise ModelError(f"{what} {str(shape)[:80]} is not a plausible input shape: give the shape of one sample "
                         f"without the batch dimension, 1 to 8 positive sizes (e.g. 64 or 3,32,32), at most "
                         f"{MAX_SAMPLE_ELEMENTS} elements")
    return tuple(int(n) for n in shape)


def dtype_name(dtype: Any, what: str = "sample_dtype") -> str:
    """'float32', 'int64' or 'int32' for a name or a torch dtype."""
    for name, dt in SAMPLE_DTYPES.items():
        if dtype == name or dtype == dt:
            return name
    raise ModelError(f"{what} {str(dtype)[:40]!r} is not supported: use one of {', '.join(SAMPLE_DTYPES)}")


def _first_layer(module: nn.Module) -> nn.Module | None:
    """The first submodule (in definition order) that holds parameters of its own."""
    for m in module.modules():
        if any(True for _ in m.parameters(recurse=False)):
            return m
    return None


def infer_sample_dtype(module: nn.Module, given: Any = None) -> str:
    """The input dtype: `given`, else the model's `sample_dtype` attribute, else int64 when its first layer
    is an nn.Embedding / nn.EmbeddingBag (token ids), else float32."""
    if given is not None:
        return dtype_name(given)
    attr = getattr(module, "sample_dtype", None)
    if attr is not None:
        return dtype_name(attr, f"{type(module).__name__}.sample_dtype")
    return "int64" if isinstance(_first_layer(module), (nn.Embedding, nn.EmbeddingBag)) else DEFAULT_DTYPE


def id_bound(module: nn.Module | None) -> int | None:
    """Exclusive upper bound of integer inputs: the smallest embedding table's row count (None: no table)."""
    if module is None:
        return None
    sizes = [m.num_embeddings for m in module.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag))]
    return min(sizes) if sizes else None


def made_up_inputs(n: int, shape: tuple[int, ...], dtype: str, high: int | None,
                   generator: torch.Generator, normal: bool = False) -> torch.Tensor:
    """`n` inputs of `shape`: uniform (or standard normal) floats, or integer ids in [0, high) (high unknown:
    0 and 1, which every table with two rows holds)."""
    if dtype == DEFAULT_DTYPE:
        return (torch.randn if normal else torch.rand)((n, *shape), generator=generator)
    return torch.randint(0, max(int(high or 2), 1), (n, *shape), generator=generator, dtype=SAMPLE_DTYPES[dtype])
