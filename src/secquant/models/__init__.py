"""Float models in: built-ins, Hugging Face directories, `package.module:factory`."""

from __future__ import annotations

from pathlib import Path

from ..errors import ModelError
from .base import Adapter, ModelHandle
from .checkpoint import load_state_dict
from .digits import DigitsCNN, TensorClassifierAdapter, load_builtin_digits, splits
from .encoder import load_builtin_minilm, load_encoder_dir
from .factory import is_factory_spec, load_factory

BUILTINS = {"builtin:digits": load_builtin_digits, "builtin:minilm": load_builtin_minilm}


def load_model(spec: str, weights: str | None = None) -> ModelHandle:
    """Resolve a model spec to a float model handle."""
    if spec in BUILTINS:
        if weights is not None:
            raise ModelError(f"--weights cannot be combined with {spec}")
        return BUILTINS[spec]()
    if spec.startswith("builtin:"):
        raise ModelError(f"unknown built-in {spec!r}; choose one of: {', '.join(BUILTINS)}")
    p = Path(spec)
    if p.is_dir():
        if weights is not None:
            raise ModelError("--weights is for factory models; a model directory carries its own weights")
        return load_encoder_dir(p)
    if is_factory_spec(spec):
        return load_factory(spec, weights)
    raise ModelError(
        f"cannot resolve model {spec!r}: use builtin:digits, builtin:minilm, a Hugging Face model "
        "directory, or package.module:factory with --weights FILE.safetensors"
    )


__all__ = ["Adapter", "ModelHandle", "DigitsCNN", "TensorClassifierAdapter", "load_model", "load_state_dict",
           "load_builtin_digits", "load_builtin_minilm", "load_encoder_dir", "splits", "BUILTINS"]
