"""Calibration / evaluation data files: text for encoders, tensors for everything else.

Tensor files are safetensors or .npy (read with allow_pickle=False): never pickle.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from ..errors import CalibrationError

TEXT_SUFFIXES = {".txt", ".jsonl", ".csv"}
TENSOR_SUFFIXES = {".safetensors", ".npy"}


def _existing(path: str | Path) -> Path:
    p = Path(path)
    if not p.is_file():
        raise CalibrationError(f"data file {p} does not exist")
    return p


def read_texts(path: str | Path) -> list[str]:
    """Non-empty texts from .txt (a line each), .jsonl (field 'text') or .csv (column 'text' or the first)."""
    p = _existing(path)
    suffix = p.suffix.lower()
    texts: list[str] = []
    if suffix == ".txt":
        texts = [line.strip() for line in p.read_text(encoding="utf-8").splitlines()]
    elif suffix == ".jsonl":
        for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if isinstance(rec, str):
                texts.append(rec)
            elif isinstance(rec, dict) and isinstance(rec.get("text"), str):
                texts.append(rec["text"])
            else:
                raise CalibrationError(f"{p}:{i}: each JSONL record must be a string or have a string field 'text'")
    elif suffix == ".csv":
        with p.open(newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        if rows:
            header = [h.strip().lower() for h in rows[0]]
            col = header.index("text") if "text" in header else 0
            texts = [r[col] for r in rows[1:] if len(r) > col]
    else:
        raise CalibrationError(f"{p}: text data must be .txt, .jsonl or .csv")
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise CalibrationError(f"{p} holds no text samples")
    return texts


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors (keys kept) or .npy (as 'inputs')."""
    p = _existing(path)
    suffix = p.suffix.lower()
    try:
        if suffix == ".safetensors":
            out = load_file(str(p))
        elif suffix == ".npy":
            out = {"inputs": torch.from_numpy(np.load(p, allow_pickle=False))}
        else:
            raise CalibrationError(f"{p}: tensor data must be .safetensors or .npy")
    except CalibrationError:
        raise
    except ValueError as e:
        raise CalibrationError(f"{p}: cannot read without pickle: {e}") from None
    except Exception as e:
        raise CalibrationError(f"{p}: not a readable tensor file: {e}") from None
    if not out:
        raise CalibrationError(f"{p} holds no tensors")
    return out


def input_tensor(data: dict[str, torch.Tensor], path: str | Path, sample_shape: tuple[int, ...] | None) -> torch.Tensor:
    """The 'inputs' tensor (or the only tensor), checked against the model's per-sample shape."""
    if "inputs" in data:
        x = data["inputs"]
    elif len(data) == 1:
        x = next(iter(data.values()))
    else:
        raise CalibrationError(f"{path}: several tensors and none named 'inputs': name the input tensor 'inputs'")
    if x.ndim == 0 or x.shape[0] == 0:
        raise CalibrationError(f"{path}: the input tensor is empty")
    if sample_shape is not None and tuple(x.shape[1:]) != tuple(sample_shape):
        if x[0].numel() == int(np.prod(sample_shape)):
            x = x.reshape(x.shape[0], *sample_shape)
        else:
            raise CalibrationError(
                f"{path}: samples have shape {tuple(x.shape[1:])}, the model expects {tuple(sample_shape)} "
                "(first dimension = samples)"
            )
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise CalibrationError(f"{path}: the inputs contain NaN or Inf")
    return x.float() if x.is_floating_point() else x


def write_tensors(x: torch.Tensor, path: str | Path) -> Path:
    """Write inputs as a `.safetensors` data file (key 'inputs') that --calib / --data read, atomically."""
    from safetensors.torch import save_file

    from ..artifact.fsutil import atomic_file

    p = Path(path)
    if p.suffix.lower() != ".safetensors":
        raise CalibrationError(f"{p}: tensor data is written as .safetensors")
    with atomic_file(p) as tmp:
        save_file({"inputs": x.detach().float().contiguous()}, str(tmp))
    return p
