"""Run-time integrity of everything a model's forward pass reads, against bit flips (RADAR-style keyed
group checksums, Li et al. 2021, extended from the packed codes to every tensor).

What is covered is enumerated from the module itself (`reachable_tensors`): the parameters and buffers,
persistent or not, of every submodule, and every tensor held as a plain attribute (such as a layer's
dequantized-weight cache). A new layer type or a new tensor attribute is covered without being named
here. A tensor that appears after the guard was made, or one that disappears, is reported (fail
closed), except a derived tensor a layer declares (`derived_tensors`): its absence only means the
forward recomputes it from tensors that are checked.

Each tensor's raw bytes are cut into groups of `group_bytes` bytes with a keyed checksum each (see
security.checksums): every single-bit flip changes it, and without the key no compensating flips can
be aimed. Sealing records the checksums of every tensor of model.safetensors under a fresh random key,
signed and encrypted with the model. Loading (`from_record`) first checks the rebuilt model against
that record and refuses a mismatch, then takes the run-time reference (the faster
`runtime_checksums`) of those verified tensors, computes the derived tensors (caches) from them and
takes theirs, and keeps the guard for checks while the model runs.

`repair()` repairs in place what can be: a corrupted group of packed codes is set to the code of 0.0
(degrading gracefully instead of letting one flipped high bit dominate a layer), a corrupted cache is
recomputed from the verified codes. Any other float or integer tensor (scales, zero points, biases,
normalization parameters, ...) cannot be rebuilt in memory: the model must be reloaded.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..errors import ArtifactError
from ..quant.modules import QuantizedWeightMixin
from ..quant.primitives import pack, unpack
from .checksums import DEFAULT_GROUP_BYTES, INTEGRITY_NAME, checksums_of, read_record, runtime_checksums

__all__ = ["INTEGRITY_NAME", "Corruption", "IntegrityError", "IntegrityGuard", "reachable_tensors"]

_MODULE_DICTS = ("_parameters", "_buffers", "_modules")  # walked through named_modules / directly


def _tensors_in(value, path: str, depth: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Tensors in an attribute value: the value itself, or inside (nested) lists, tuples and dicts."""
    if isinstance(value, torch.Tensor):
        yield path, value
    elif depth < 4 and isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _tensors_in(v, f"{path}.{i}", depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for k, v in value.items():
            yield from _tensors_in(v, f"{path}.{k}", depth + 1)


def _walk(model: nn.Module) -> Iterator[tuple[str, str, torch.Tensor]]:
    """(module name, attribute path, tensor) for every tensor reachable from `model`'s submodules."""
    for mname, m in model.named_modules(remove_duplicate=False):
        for attr, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                yield mname, attr, t
        for attr, v in list(vars(m).items()):
            if attr in _MODULE_DICTS or isinstance(v, nn.Module):
                continue
            for path, t in _tensors_in(v, attr):
                yield mname, path, t


def _join(layer: str, tensor: str) -> str:
    return f"{layer}.{tensor}" if layer else tensor


def reachable_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor the forward pass can read from `model`, by dotted name: parameters and buffers
    (persistent or not) of every submodule, and tensors held as plain attributes (caches)."""
    return {_join(mname, attr): t for mname, attr, t in _walk(model)}


@dataclass
class Corruption:
    """One group of `tensor` (an attribute of module `layer`) that no longer matches its checksum.

    `kind`: "codes" (packed quantized weights: repairable by zeroing the group), "derived" (a cache
    computed from other tensors: repairable by recomputing it), "tensor" (any other tensor: reload the
    model), "structure" (a tensor appeared, vanished or changed shape: reload). `repaired` says what
    `IntegrityGuard.repair` did ("zeroed", "rebuilt"), None when it could not repair it.
    """

    layer: str
    group: int
    byte_range: tuple[int, int]
    tensor: str = "qweight"
    kind: str = "codes"
    detail: str = ""
    repaired: str | None = None

    @property
    def name(self) -> str:
        return _join(self.layer, self.tensor)

    def describe(self) -> str:
        if self.kind == "structure":
            return f"{self.name} ({self.detail})"
        return f"{self.name} bytes {self.byte_range[0]}-{self.byte_range[1]}"


class IntegrityError(ArtifactError):
    """Tensors of a loaded model do not match their checksums (and cannot all be repaired in place)."""

    def __init__(self, message: str, corruptions: list[Corruption]) -> None:
        super().__init__(message)
        self.corruptions = corruptions


def _describe(bad: list[Corruption], limit: int = 5) -> str:
    names = sorted({c.name for c in bad})
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


@dataclass
class _Ref:
    sums: np.ndarray
    dtype: torch.dtype
    shape: tuple[int, ...]


class IntegrityGuard:
    """Keyed checksums of every tensor a model holds, checked on demand.

    Without `reference` the current tensors are taken as correct (a fresh guard). With it (the
    checksums of every stored tensor recorded at seal time, see `from_record`) the model is first
    judged against the record, and an `IntegrityError` refuses a mismatch; tensors the record cannot
    hold (caches, non-persistent buffers) get their checksums after that check passed.
    """

    def __init__(self, model: nn.Module, key: bytes, group_bytes: int = DEFAULT_GROUP_BYTES,
                 reference: dict[str, np.ndarray] | None = None) -> None:
        if not key:
            raise ValueError("an integrity key is required")
        self.model, self.key, self.group_bytes = model, key, group_bytes
        # quantized layers, by name (what the bit-flip audit attacks and what repair can zero)
        self.layers = {n: m for n, m in model.named_modules()
                       if isinstance(m, QuantizedWeightMixin) and m.weight_args is not None}
        self.reference: dict[str, _Ref] = {}
        self._derived = {_join(mname, attr) for mname, m in model.named_modules(remove_duplicate=False)
                         for attr in getattr(m, "derived_tensors", ())}
        self._owner = self._owners()
        if reference is not None:
            self._verify_stored(reference)
        self._refresh_derived(model.modules())  # caches from the (verified) stored tensors, then their checksums
        self._owner = self._owners()
        for name, t in reachable_tensors(model).items():
            if name not in self.reference:
                self.reference[name] = self._ref(name, t)

    def _owners(self) -> dict[str, tuple[str, str]]:
        return {_join(mname, attr): (mname, attr) for mname, attr, _ in _walk(self.model)}

    @classmethod
    def from_record(cls, model: nn.Module, record: bytes) -> IntegrityGuard:
        """A guard judging `model` against an `integrity.safetensors` record (key and checksums)."""
        key, group_bytes, ref = read_record(record)
        return cls(model, key, group_bytes, reference=ref)

    # -- checksums -------------------------------------------------------------------------------

    @staticmethod
    def _raw(t: torch.Tensor) -> np.ndarray:
        return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy()

    def _sums(self, name: str, t: torch.Tensor) -> np.ndarray:
        """The run-time checksums (security.checksums.runtime_checksums) of a tensor's bytes."""
        return runtime_checksums(self._raw(t), self.key, name, self.group_bytes)

    def _ref(self, name: str, t: torch.Tensor) -> _Ref:
        return _Ref(self._sums(name, t), t.dtype, tuple(t.shape))

    def _verify_stored(self, record: dict[str, np.ndarray]) -> None:
        """Judge the stored tensors (those in the model's state dict) against the sealed record."""
        stored = {n: t for n, t in self.model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)}
        if set(record) != set(stored):
            only_rec, only_mod = sorted(set(record) - set(stored)), sorted(set(stored) - set(record))
            raise ArtifactError("the integrity record does not describe this model's tensors (record: "
                                f"{len(record)}, model: {len(stored)}; only in the record: {only_rec[:3]}, only in "
                                f"the model: {only_mod[:3]}): it was sealed for another model")
        bad = []
        for name, t in stored.items():
            groups = -(-t.numel() * t.element_size() // self.group_bytes)
            if record[name].shape != (groups,):
                raise ArtifactError(f"integrity record for {name!r} has {record[name].size} groups, expected {groups}")
            raw = self._raw(t).copy()  # one snapshot: the run-time reference is of exactly the bytes verified
            sealed = _Ref(np.asarray(record[name], dtype=np.uint32), t.dtype, tuple(t.shape))
            bad += self._compare(name, t, sealed, checksums_of(raw, self.key, name, self.group_bytes))
            self.reference[name] = _Ref(runtime_checksums(raw, self.key, name, self.group_bytes), t.dtype, tuple(t.shape))
        if bad:
            raise IntegrityError(f"integrity check failed: {len(bad)} group(s) in {_describe(bad)} do not match the "
                                 "checksums recorded at seal time; refusing to load", bad)

    @property
    def groups(self) -> int:
        """How many groups the guard checks."""
        return sum(r.sums.size for r in self.reference.values())

    @property
    def tensors(self) -> list[str]:
        """The names of the tensors the guard covers."""
        return list(self.reference)

    # -- checking --------------------------------------------------------------------------------

    def _where(self, name: str) -> tuple[str, str]:
        return self._owner.get(name) or ("", name)

    def _kind(self, name: str) -> str:
        layer, attr = self._where(name)
        if name in self._derived:
            return "derived"
        return "codes" if attr == "qweight" and layer in self.layers else "tensor"

    def _compare(self, name: str, t: torch.Tensor, ref: _Ref, sums: np.ndarray | None = None) -> list[Corruption]:
        layer, attr = self._where(name)
        if t.dtype != ref.dtype or tuple(t.shape) != ref.shape:
            return [Corruption(layer, -1, (0, 0), attr, "structure",
                               f"now {t.dtype} {tuple(t.shape)}, was {ref.dtype} {ref.shape}")]
        nbytes = t.numel() * t.element_size()
        diff = np.flatnonzero((self._sums(name, t) if sums is None else sums) != ref.sums).tolist()
        kind = self._kind(name)
        return [Corruption(layer, g, (g * self.group_bytes, min(nbytes, (g + 1) * self.group_bytes)), attr, kind)
                for g in diff]

    def check(self) -> list[Corruption]:
        """Every group of every covered tensor whose checksum no longer matches, and every tensor that
        appeared or vanished since the guard was made (derived caches may vanish: they are recomputed)."""
        current = reachable_tensors(self.model)
        bad: list[Corruption] = []
        for name, ref in self.reference.items():
            t = current.pop(name, None)
            if t is None:
                if name not in self._derived:
                    layer, attr = self._where(name)
                    bad.append(Corruption(layer, -1, (0, 0), attr, "structure", "no longer held by the model"))
                continue
            bad += self._compare(name, t, ref)
        if current:
            self._owner.update(self._owners())
        for name in current:  # held now, not when the guard was made: nothing vouches for it
            layer, attr = self._where(name)
            bad.append(Corruption(layer, -1, (0, 0), attr, "structure", "not covered: appeared after the guard was made"))
        return bad

    # -- repair ----------------------------------------------------------------------------------

    def _refresh_derived(self, modules) -> None:
        for m in modules:
            if hasattr(m, "refresh_derived"):
                m.refresh_derived()

    @torch.no_grad()
    def repair(self, corruptions: list[Corruption]) -> list[Corruption]:
        """Repair in place what can be: corrupted groups of packed codes are set to the code of 0.0
        ("zeroed"), corrupted caches are recomputed from the verified tensors ("rebuilt"). Returns the
        corruptions it could not repair (other tensors, structural changes): the model must be reloaded."""
        unrepairable = [c for c in corruptions if c.kind not in ("codes", "derived")]
        blocked = {c.layer for c in unrepairable}  # a layer whose qparams are corrupt: do not rebuild from them
        touched: set[str] = set()
        for c in corruptions:
            if c.kind == "codes" and c.layer not in blocked:
                self._zero_group(self.layers[c.layer], c.byte_range)
                c.repaired = "zeroed"
                touched.add(c.layer)
            elif c.kind == "derived" and c.layer not in blocked:
                c.repaired = "rebuilt"
                touched.add(c.layer)
            elif c.kind in ("codes", "derived"):
                unrepairable.append(c)
        for layer in touched:
            m = self.model.get_submodule(layer)
            self._refresh_derived([m])
            for mname, attr, t in _walk(m):
                name = _join(_join(layer, mname) if mname else layer, attr)
                if name in self.reference and (attr == "qweight" or name in self._derived):
                    self.reference[name] = self._ref(name, t)
        return unrepairable

    def _zero_group(self, m: QuantizedWeightMixin, byte_range: tuple[int, int]) -> None:
        """Set every code overlapping the byte range to the code that stands for 0.0 (or closest to it)."""
        bits = m.weight_args.bits
        codes = unpack(m.qweight, bits, m.rows * m.cols).to(torch.int64)
        lo, hi = byte_range[0] * 8 // bits, min(codes.numel(), -(-byte_range[1] * 8 // bits))
        codes[lo:hi] = _zero_codes(m)[lo:hi]
        m.qweight.copy_(pack(codes, bits))


def _zero_codes(m: QuantizedWeightMixin) -> torch.Tensor:
    """Per weight element (flat), the code that dequantizes to 0.0: its granule's zero point for integer
    codes, the table entry nearest to 0 for codebooks (exactly 0 in the NF4 and power-of-two tables)."""
    a = m.weight_args
    rows, cols = m.rows, m.cols
    if a.format != "int":
        cb = m.codebook
        if a.format == "kmeans":  # [tables, K]: one table per output channel, or one for the tensor
            idx = cb.abs().argmin(dim=1)
            full = idx.expand(rows)[:, None].expand(rows, cols) if idx.numel() == 1 else idx[:, None].expand(rows, cols)
        else:
            full = cb.abs().argmin().expand(rows, cols)
        return full.reshape(-1).to(torch.int64)
    zp = m.weight_zero_point.to(torch.int64)
    if a.granularity == "tensor":
        full = zp.expand(rows, cols)
    elif a.granularity == "channel":
        full = zp[:, None].expand(rows, cols) if a.axis in (0, -2) else zp[None, :].expand(rows, cols)
    else:
        idx = torch.arange(cols) // a.group_size
        full = zp[:, idx]
    return full.reshape(-1)
