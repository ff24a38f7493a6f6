"""Reading float weights without unpickling untrusted code.

safetensors files are read directly. Pickle-format checkpoints (.pt, .pth, .bin, .ckpt) are
opened only with `torch.load(weights_only=True)`, whose restricted unpickler refuses any
object that is not a tensor or plain container; anything that needs more is refused.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import ModelError, UnsafeInputError

PICKLE_SUFFIXES = {".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle"}


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise ModelError(f"weights file {p} does not exist")
    if p.suffix == ".safetensors":
        try:
            return load_file(str(p))
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise ModelError(f"{p} is not a valid safetensors file: {e}") from None
    if p.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            first = re.sub(r"\x1b\[[0-9;]*m", "", str(e)).strip().splitlines()[0]
            raise UnsafeInputError(
                f"{p} needs more than tensors to unpickle, so it was refused (nothing in it was run): "
                f"{first}. Convert it to safetensors in a trusted environment."
            ) from None
        except Exception as e:
            raise ModelError(f"{p} could not be read as a weights-only checkpoint: {e}") from None
        if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise ModelError(f"{p} does not hold a flat state dict of tensors")
        return obj
    raise ModelError(f"unsupported weights format {p.suffix!r}: use .safetensors (or a weights-only .pt/.bin)")


def _names(keys: list[str], shown: int = 5) -> str:
    keys = sorted(keys)
    more = f", ... ({len(keys) - shown} more)" if len(keys) > shown else ""
    return ", ".join(keys[:shown]) + more


def describe_mismatch(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> str | None:
    """What keeps `sd` from loading into `model` (missing keys, unexpected keys, shape mismatches: counts and
    the first few of each), in one line; None when it fits."""
    want = model.state_dict()
    missing = [k for k in want if k not in sd]
    unexpected = [k for k in sd if k not in want]
    shapes = [f"{k} (file {list(sd[k].shape)}, model {list(want[k].shape)})" for k in want
              if k in sd and tuple(sd[k].shape) != tuple(want[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s): {_names(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {_names(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): {_names(shapes, 3)}")
    return "; ".join(parts) or None


def load_into(model: torch.nn.Module, sd: dict[str, torch.Tensor], weights: str, spec: str) -> None:
    """Load a float state dict into a freshly built model, or refuse naming every kind of mismatch."""
    problem = describe_mismatch(model, sd)
    if problem is None:
        try:
            model.load_state_dict(sd)
            return
        except RuntimeError as e:  # e.g. a dtype that cannot be copied
            problem = str(e).splitlines()[0]
    raise ModelError(f"{weights} does not fit {spec}: {problem}. Pass the weights saved from this model's "
                     "state_dict() (safetensors.torch.save_file(model.state_dict(), ...))")
