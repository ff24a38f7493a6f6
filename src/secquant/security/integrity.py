"""Run-time integrity of quantized weights against bit flips (in the spirit of RADAR, Li et al. 2021).

The packed integer codes of every quantized layer are cut into groups of `group_bytes` bytes,
and each group gets a keyed checksum (see security.checksums): every single-bit flip changes it,
and without the key an attacker cannot craft compensating flips. `check()` is cheap enough to
run periodically while serving; `repair()` zeroes the weights of corrupted groups (the code that
means 0.0), which degrades gracefully instead of letting one flipped high bit dominate a layer.

Sealing computes the checksums from the artifact's own `model.safetensors` with a fresh random
key and stores both in `integrity.safetensors` inside the signed, encrypted payload (listed in
the manifest like every file): the signature stops anyone from rewriting the reference, the
encryption keeps the key from everyone but the recipients. Loading checks the rebuilt model
against it before returning (fail closed) and keeps the guard for checks while serving.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ArtifactError
from ..quant.modules import QuantizedWeightMixin
from ..quant.primitives import pack, unpack
from .checksums import DEFAULT_GROUP_BYTES, INTEGRITY_NAME, checksums_of, read_record

__all__ = ["INTEGRITY_NAME", "Corruption", "IntegrityGuard"]


@dataclass
class Corruption:
    layer: str
    group: int
    byte_range: tuple[int, int]


class IntegrityGuard:
    """Checksums of every quantized layer's packed codes, checked on demand.

    Without `reference` the current codes are taken as correct (a fresh guard); with it (the
    checksums recorded at seal time, see `from_record`) the model is judged against the record.
    """

    def __init__(self, model: nn.Module, key: bytes, group_bytes: int = DEFAULT_GROUP_BYTES,
                 reference: dict[str, np.ndarray] | None = None) -> None:
        if not key:
            raise ValueError("an integrity key is required")
        self.model, self.key, self.group_bytes = model, key, group_bytes
        self.layers = {n: m for n, m in model.named_modules()
                       if isinstance(m, QuantizedWeightMixin) and m.weight_args is not None}
        if reference is None:
            self.reference = {n: self._checksums(n) for n in self.layers}
        else:
            if set(reference) != set(self.layers):
                raise ArtifactError("the integrity record does not describe this model's quantized layers "
                                    f"(record: {len(reference)} layers, model: {len(self.layers)})")
            for n, ref in reference.items():
                groups = -(-self._nbytes(n) // group_bytes)
                if ref.shape != (groups,):
                    raise ArtifactError(f"integrity record for {n!r} has {ref.size} groups, expected {groups}")
            self.reference = {n: np.asarray(t, dtype=np.uint32) for n, t in reference.items()}

    @classmethod
    def from_record(cls, model: nn.Module, record: bytes) -> IntegrityGuard:
        """A guard judging `model` against an `integrity.safetensors` record (key and checksums)."""
        key, group_bytes, ref = read_record(record)
        return cls(model, key, group_bytes, reference=ref)

    @property
    def groups(self) -> int:
        """How many weight groups the guard checks."""
        return sum(r.size for r in self.reference.values())

    def _codes(self, name: str) -> np.ndarray:
        """The layer's packed codes as raw bytes, sharing the model's memory (a flip there shows here)."""
        q = self.layers[name].qweight.detach()
        return q.contiguous().reshape(-1).view(torch.uint8).numpy()

    def _nbytes(self, name: str) -> int:
        q = self.layers[name].qweight
        return q.numel() * q.element_size()

    def _checksums(self, name: str) -> np.ndarray:
        return checksums_of(self._codes(name), self.key, name, self.group_bytes)

    def check(self) -> list[Corruption]:
        """Every group whose checksum no longer matches."""
        bad = []
        for name in self.layers:
            diff = np.flatnonzero(self._checksums(name) != self.reference[name]).tolist()
            n = self._nbytes(name)
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
