"""Numpy views of a quantized layer's integer weights, in the layouts ONNX Runtime's kernels take."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from torch import nn

# ----------------------------------------------------------------------------------------------
# numpy helpers
# ----------------------------------------------------------------------------------------------

def pack_bits(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes along the last axis, first code in the low bits (bits in 2, 4, 8)."""
    codes = np.asarray(codes, dtype=np.uint8)
    if bits == 8:
        return np.ascontiguousarray(codes)
    per = 8 // bits
    n = codes.shape[-1]
    padn = -(-n // per) * per
    c = np.zeros(codes.shape[:-1] + (padn,), np.uint8)
    c[..., :n] = codes
    c = c.reshape(codes.shape[:-1] + (padn // per, per))
    out = np.zeros(c.shape[:-1], np.uint8)
    for j in range(per):
        out |= (c[..., j] << np.uint8(bits * j)).astype(np.uint8)
    return out


def kernel_bits(bits: int) -> int:
    """Storage width of ORT's N-bit kernels that holds b-bit codes exactly (3 -> 4, 5..7 -> 8)."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def is_pow2_block(n: int | None) -> bool:
    return n is not None and n >= 16 and (n & (n - 1)) == 0


def row_block(k: int) -> int:
    """Block size carrying one scale per row through a block-wise kernel: a power of 2 in [16, 128]."""
    return min(128, max(16, 1 << max(0, (k - 1).bit_length())))


def int_range(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


# ----------------------------------------------------------------------------------------------
# Weight views of a quantized layer
# ----------------------------------------------------------------------------------------------

@dataclass
class WeightView:
    """A quantized 2-D weight [rows, cols] in numpy: codes, scale, zero point and granularity."""

    codes: np.ndarray  # uint8 [rows, cols]
    scale: np.ndarray  # compact qparam shape
    zp: np.ndarray  # int64, same shape
    bits: int
    gran: str  # tensor | row | col | group
    group: int | None

    @property
    def rows(self) -> int:
        return self.codes.shape[0]

    @property
    def cols(self) -> int:
        return self.codes.shape[1]

    @property
    def signed_int8(self) -> bool:
        """8-bit codes with zero point 128 everywhere: symmetric int8, stored exactly as code - 128."""
        return self.bits == 8 and bool(np.all(self.zp == 128))

    def row_params(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-row scale and zero point (tensor or row granularity)."""
        if self.gran == "tensor":
            return (np.full(self.rows, float(self.scale), np.float32), np.full(self.rows, int(self.zp), np.int64))
        return self.scale.astype(np.float32), self.zp.astype(np.int64)

    def block_params(self, bs: int) -> tuple[np.ndarray, np.ndarray]:
        """[rows, ceil(cols / bs)] scale and zero point for a block-wise kernel of block size bs."""
        if self.gran == "group":
            return self.scale.astype(np.float32), self.zp.astype(np.int64)
        kb = -(-self.cols // bs)
        s, z = self.row_params()
        return np.repeat(s[:, None], kb, 1), np.repeat(z[:, None], kb, 1)


def weight_view(mod: nn.Module) -> WeightView:
    a = mod.weight_args
    g = a.granularity
    gran = {"tensor": "tensor", "group": "group"}.get(g) or ("row" if a.axis in (0, -2) else "col")
    return WeightView(mod.weight_codes().numpy().astype(np.uint8), mod.weight_scale.detach().float().numpy(),
              mod.weight_zero_point.detach().numpy().astype(np.int64), a.bits, gran,
              a.group_size if gran == "group" else None)


def int8_kernel(mod) -> bool:
    """8-bit per-channel (or per-tensor) integer weights x 8-bit activations: an integer GEMM applies."""
    wa = mod.weight_args
    act = getattr(mod, "input_quant", None)
    return (wa is not None and wa.format == "int" and wa.bits == 8 and act is not None and act.args.bits == 8
            and (wa.granularity == "tensor" or (wa.granularity == "channel" and wa.axis in (0, -2))))


def zero_point_rows(colsum: np.ndarray) -> int:
    """Number of int8 weight rows (entries within [-127, 127]) that can sum to -colsum, rounded up to 4."""
    r = math.ceil(int(np.abs(colsum).max()) / 127) if colsum.size else 0
    return -(-r // 4) * 4


