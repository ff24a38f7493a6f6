"""Run-time integrity of quantized weights against bit flips (in the spirit of RADAR, Li et al. 2021).

The packed integer codes of every quantized layer are cut into groups of `group_bytes`
bytes, and each group gets a keyed checksum: sum_i (byte_i XOR m_i) * w_i mod 2^32, with
masks m_i and odd multipliers w_i drawn from a secret key. A single flipped bit changes one
term by an odd multiple of a power of two below 2^8, which is never 0 mod 2^32, so every
single-bit flip is detected; without the key an attacker cannot craft compensating flips.
`check()` is cheap enough to run periodically while serving; `repair()` zeroes the weights
of corrupted groups (the code that means 0.0), which degrades gracefully instead of
letting one flipped high bit dominate a layer.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn

from ..quant.modules import QuantizedWeightMixin
from ..quant.primitives import pack, unpack


def _key_stream(key: bytes, label: str, n: int) -> torch.Tensor:
    """n pseudo-random 32-bit words from (key, label) (SHA-256 seeded generator, reproducible)."""
    seed = int.from_bytes(hashlib.sha256(key + b"\0" + label.encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)


@dataclass
class Corruption:
    layer: str
    group: int
    byte_range: tuple[int, int]


class IntegrityGuard:
    """Checksums of every quantized layer's packed codes, checked on demand."""

    def __init__(self, model: nn.Module, key: bytes, group_bytes: int = 64) -> None:
        if not key:
            raise ValueError("an integrity key is required")
        self.model, self.key, self.group_bytes = model, key, group_bytes
        self.layers = {n: m for n, m in model.named_modules()
                       if isinstance(m, QuantizedWeightMixin) and m.weight_args is not None}
        self._weights = {}
        self.reference = {n: self._checksums(n) for n in self.layers}

    def _grouped(self, name: str) -> torch.Tensor:
        q = self.layers[name].qweight.reshape(-1).to(torch.int64)
        pad = (-q.numel()) % self.group_bytes
        return torch.nn.functional.pad(q, (0, pad)).reshape(-1, self.group_bytes)

    def _checksums(self, name: str) -> torch.Tensor:
        b = self._grouped(name)
        if name not in self._weights:
            words = _key_stream(self.key, name, 2 * b.numel()).reshape(2, *b.shape)
            self._weights[name] = (words[0] & 0xFF, words[1] | 1)  # byte masks, odd multipliers
        mask, mult = self._weights[name]
        return (((b ^ mask) * mult) % 2**32).sum(dim=1) % 2**32

    def check(self) -> list[Corruption]:
        """Every group whose checksum no longer matches."""
        bad = []
        for name in self.layers:
            diff = (self._checksums(name) != self.reference[name]).nonzero().flatten().tolist()
            n = self.layers[name].qweight.numel()
            bad += [Corruption(name, g, (g * self.group_bytes, min(n, (g + 1) * self.group_bytes))) for g in diff]
        return bad

    @torch.no_grad()
    def repair(self, corruptions: list[Corruption]) -> int:
        """Set the weights of corrupted groups to exactly 0.0; returns the number of groups zeroed."""
        for c in corruptions:
            m = self.layers[c.layer]
            a = m.weight_args
            if a.format != "int":
                raise ValueError(f"{c.layer}: repair supports uniform integer weights only")
            codes = unpack(m.qweight, a.bits, m.rows * m.cols).to(torch.int64)
            lo, hi = c.byte_range[0] * 8 // a.bits, min(codes.numel(), -(-c.byte_range[1] * 8 // a.bits))
            zp = _zero_codes(m)[lo:hi]
            codes[lo:hi] = zp
            m.qweight.copy_(pack(codes, a.bits))
            m._w_cache = None
        for name in {c.layer for c in corruptions}:
            self.reference[name] = self._checksums(name)
        return len(corruptions)


def _zero_codes(m: QuantizedWeightMixin) -> torch.Tensor:
    """The code of each weight element that dequantizes to 0.0 (its granule's zero point), flat."""
    a = m.weight_args
    zp = m.weight_zero_point.to(torch.int64)
    rows, cols = m.rows, m.cols
    if a.granularity == "tensor":
        full = zp.expand(rows, cols)
    elif a.granularity == "channel":
        full = zp[:, None].expand(rows, cols) if a.axis in (0, -2) else zp[None, :].expand(rows, cols)
    else:
        idx = torch.arange(cols) // a.group_size
        full = zp[:, idx]
    return full.reshape(-1)
