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
