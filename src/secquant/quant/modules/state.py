"""A quantized module's tensors as they are saved (safetensors-ready), and their size."""

from __future__ import annotations

import torch
from safetensors.torch import save
from torch import nn


def tensors_for_save(module: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous copies; tensors that share storage are cloned (safetensors refuses aliasing)."""
    out, seen = {}, set()
    for k, v in module.state_dict().items():
        v = v.detach()
        key = (v.untyped_storage().data_ptr(), v.storage_offset()) if v.numel() else None
        if key is not None and key in seen:
            v = v.clone()
        elif key is not None:
            seen.add(key)
        out[k] = v.contiguous()
    return out


def serialized_size(module: nn.Module, metadata: dict[str, str] | None = None) -> int:
    """Bytes of `module`'s tensors saved as one safetensors file (exact for the same metadata)."""
    return len(save(tensors_for_save(module), metadata=metadata))
