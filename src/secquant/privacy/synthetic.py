"""Public, data-free calibration inputs: what a model can be calibrated on without reading any data.

Each model kind's adapter makes them (models/): sentences of random whole words from an encoder's own
tokenizer vocabulary; ZeroQ inputs distilled from a tensor classifier's BatchNorm statistics
(quant/algorithms/datafree.py). Used by `quantize(..., calib="synthetic")` (data-free calibration) and as
the public prior and the only input of every non-DP step of DP calibration.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

SYNTHETIC = "synthetic"


def describe(handle) -> str:
    """What the data-free inputs are, for the manifest's calibration entry."""
    return handle.adapter.synthetic_description


def prior_provenance(handle) -> str:
    """Where the data-free inputs' information comes from, for the privacy ledger: they read no data file,
    but ZeroQ inputs are distilled from the float model, which holds what it was trained on."""
    return handle.adapter.synthetic_prior(getattr(handle, "spec", ""))


def synthetic_source(handle, n: int, seed: int = 0) -> Callable[[int], Iterable[Any]]:
    """`n` public calibration samples for `handle`, made once; call the result with a batch size to
    iterate them (as often as needed: DP calibration reads them at two batch sizes)."""
    return handle.adapter.synthetic_batches(handle.module, n, seed)
