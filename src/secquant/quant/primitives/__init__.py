"""Pure tensor functions: qparams, saturating and modular quantization, packing."""

from .affine import dequantize, fake_quantize, group_view, quantize, quantize_tensor, reduce_range, ungroup_view
from .granularity import Granularity, PerChannel, PerGroup, PerTensor, PerToken
from .modular import additive_shares, centered_lift, modular_add, modular_decode, modular_encode, reconstruct
from .packing import pack, packed_nbytes, unpack
from .ranges import choose_qparams, qrange

__all__ = [
    "Granularity", "PerChannel", "PerGroup", "PerTensor", "PerToken",
    "choose_qparams", "qrange", "quantize", "dequantize", "fake_quantize", "quantize_tensor",
    "reduce_range", "group_view", "ungroup_view",
    "modular_encode", "modular_decode", "modular_add", "centered_lift", "additive_shares", "reconstruct",
    "pack", "unpack", "packed_nbytes",
]
