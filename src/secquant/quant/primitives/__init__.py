"""Pure tensor functions: qparams, saturating and modular quantization, packing."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..._lazy import lazy_exports
from .granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken  # torch-free: the recipe schema uses them

if TYPE_CHECKING:
    from .affine import dequantize, fake_quantize, group_view, quantize, quantize_tensor, reduce_range, ungroup_view
    from .modular import additive_shares, centered_lift, modular_add, modular_decode, modular_encode, reconstruct
    from .packing import pack, packed_nbytes, unpack
    from .ranges import choose_qparams, qrange
    from .rotation import is_rotatable, rotate, rotate_hessian, rotation_signs, unrotate

_EXPORTS = {
    **dict.fromkeys(["dequantize", "fake_quantize", "group_view", "quantize", "quantize_tensor", "reduce_range",
                     "ungroup_view"], "affine"),
    **dict.fromkeys(["additive_shares", "centered_lift", "modular_add", "modular_decode", "modular_encode",
                     "reconstruct"], "modular"),
    **dict.fromkeys(["pack", "packed_nbytes", "unpack"], "packing"),
    **dict.fromkeys(["choose_qparams", "qrange"], "ranges"),
    **dict.fromkeys(["is_rotatable", "rotate", "rotate_hessian", "rotation_signs", "unrotate"], "rotation"),
}
__getattr__, __dir__ = lazy_exports(__name__, globals(), _EXPORTS)
__all__ = ["Granularity", "PerChannel", "PerGroup", "PerTensor", "PerToken", *_EXPORTS]
