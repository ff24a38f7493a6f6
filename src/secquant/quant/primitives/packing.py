"""Exact packing of b-bit unsigned codes (1..8 bits) into a uint8 byte stream, and back.

Little-endian bit order: code i occupies bits [i*b, (i+1)*b) of the stream, so 4-bit codes
pack two per byte with the first code in the low nibble (ONNX MatMulNBits' layout), 2-bit
codes four per byte, and 3-bit codes eight per three bytes.
"""

from __future__ import annotations

import math

import torch


def packed_nbytes(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Flatten codes (values in [0, 2**bits)) and pack them into a 1-d uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    flat = codes.reshape(-1).to(torch.int64)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {1 << bits}) to pack at {bits} bits")
    if bits == 8:
        return flat.to(torch.uint8)
    n = flat.numel()
    pad = (-n) % 8  # 8 codes of b bits make exactly b bytes
    flat = torch.nn.functional.pad(flat, (0, pad))
    shifts = torch.arange(bits, dtype=torch.int64)
    bitstream = ((flat.unsqueeze(-1) >> shifts) & 1).reshape(-1, 8)  # 8 bits per output byte
    weights = 1 << torch.arange(8, dtype=torch.int64)
    packed = (bitstream * weights).sum(dim=-1).to(torch.uint8)
    return packed[: packed_nbytes(n, bits)]


def unpack(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of pack: the first `numel` codes as a 1-d uint8 tensor."""
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be in 1..8, got {bits}")
    if packed.numel() != packed_nbytes(numel, bits):
        raise ValueError(
            f"{packed.numel()} packed bytes cannot hold exactly {numel} codes of {bits} bits"
        )
    if bits == 8:
        return packed.reshape(-1).to(torch.uint8)
    b = packed.reshape(-1).to(torch.int64)
    pad = (-b.numel()) % bits
    b = torch.nn.functional.pad(b, (0, pad))
    bitstream = ((b.unsqueeze(-1) >> torch.arange(8, dtype=torch.int64)) & 1).reshape(-1, bits)
    codes = (bitstream * (1 << torch.arange(bits, dtype=torch.int64))).sum(dim=-1)
    return codes[:numel].to(torch.uint8)
