"""Run-time integrity of quantized weights against bit flips (in the spirit of RADAR, Li et al. 2021).

The packed integer codes of every quantized layer are cut into groups of `group_bytes`
bytes, and each group gets a keyed checksum: sum_i (byte_i XOR m_i) * w_i mod 2^32, with
masks m_i and odd multipliers w_i drawn from a secret key. A single flipped bit changes one
term by an odd multiple of a power of two below 2^8, which is never 0 mod 2^32, so every
single-bit flip is detected; without the key an attacker cannot craft compensating flips.
`check()` is cheap enough to run periodically while serving; `repair()` zeroes the weights
of corrupted groups (the code that means 0.0), which degrades gracefully instead of
letting one flipped high bit dominate a layer.

Sealing computes the checksums from the artifact's own `model.safetensors` with a fresh random
key and stores both in `integrity.safetensors` inside the signed, encrypted payload (listed in
the manifest like every file): the signature stops anyone from rewriting the reference, the
encryption keeps the key from everyone but the recipients. Loading checks the rebuilt model
against it before returning (fail closed) and keeps the guard for checks while serving.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ..errors import ArtifactError
from ..quant.modules import QuantizedWeightMixin
from ..quant.primitives import pack, unpack

INTEGRITY_NAME = "integrity.safetensors"
SCHEME = "secquant.keyed-group-sum.v1"  # sum_i (byte_i ^ m_i) * w_i mod 2^32 per group, (m, w) from the key
DEFAULT_GROUP_BYTES = 64


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


def _group_checksums(qweight: torch.Tensor, key: bytes, name: str, group_bytes: int,
                     cache: dict | None = None) -> torch.Tensor:
    """Keyed checksum of each `group_bytes`-byte group of one layer's packed codes (int64 in [0, 2^32))."""
    q = qweight.reshape(-1).to(torch.int64)
    b = torch.nn.functional.pad(q, (0, (-q.numel()) % group_bytes)).reshape(-1, group_bytes)
    if cache is None or name not in cache:
        words = _key_stream(key, name, 2 * b.numel()).reshape(2, *b.shape)
        weights = (words[0] & 0xFF, words[1] | 1)  # byte masks, odd multipliers
        if cache is not None:
            cache[name] = weights
    else:
        weights = cache[name]
    mask, mult = weights
    return (((b ^ mask) * mult) % 2**32).sum(dim=1) % 2**32


def _group_checksums_chunked(qweight, key: bytes, name: str, group_bytes: int,
                             chunk_bytes: int = 1 << 16) -> torch.Tensor:
    """The same checksums as `_group_checksums`, in bounded memory (for sealing large models).

    `_group_checksums` materializes the whole key stream (2 x int64 per weight byte) and int64
    copies of the codes, about 50x a layer's size. Here the stream is drawn in chunks from one
    generator, in the same order (all masks, then all multipliers): the masks are kept as
    uint8 (1 byte per weight byte), the multipliers and products never exceed one chunk.
    Products are < 2^40, so a group's sum fits int64 and one final mod 2^32 gives the same value.
    `qweight` is a tensor or a `(read(start, stop) -> 1-D tensor, numel)` pair (codes read lazily).
    """
    if isinstance(qweight, torch.Tensor):
        flat = qweight.reshape(-1)
        read, n = (lambda a, b: flat[a:b]), flat.numel()
    else:
        read, n = qweight
    groups = -(-n // group_bytes)
    total = groups * group_bytes
    seed = int.from_bytes(hashlib.sha256(key + b"\0" + name.encode()).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed)
    step = max(1, chunk_bytes // group_bytes) * group_bytes
    masks = torch.empty(total, dtype=torch.uint8)
    for s in range(0, total, step):
        e = min(total, s + step)
        masks[s:e] = torch.randint(0, 2**32, (e - s,), generator=g, dtype=torch.int64) & 0xFF
    out = torch.empty(groups, dtype=torch.int64)
    for s in range(0, total, step):
        e = min(total, s + step)
        prod = torch.randint(0, 2**32, (e - s,), generator=g, dtype=torch.int64) | 1
        b = read(s, min(e, n)).to(torch.int64)
        if b.numel() < e - s:
            b = torch.nn.functional.pad(b, (0, e - s - b.numel()))
        prod.mul_(b.bitwise_xor_(masks[s:e]))
        out[s // group_bytes: e // group_bytes] = prod.view(-1, group_bytes).sum(dim=1) % 2**32
    return out


class IntegrityGuard:
    """Checksums of every quantized layer's packed codes, checked on demand.

    Without `reference` the current codes are taken as correct (a fresh guard); with it (the
    checksums recorded at seal time, see `from_record`) the model is judged against the record.
    """

    def __init__(self, model: nn.Module, key: bytes, group_bytes: int = DEFAULT_GROUP_BYTES,
                 reference: dict[str, torch.Tensor] | None = None) -> None:
        if not key:
            raise ValueError("an integrity key is required")
        self.model, self.key, self.group_bytes = model, key, group_bytes
        self.layers = {n: m for n, m in model.named_modules()
                       if isinstance(m, QuantizedWeightMixin) and m.weight_args is not None}
        self._weights: dict = {}
        if reference is None:
            self.reference = {n: self._checksums(n) for n in self.layers}
        else:
            if set(reference) != set(self.layers):
                raise ArtifactError("the integrity record does not describe this model's quantized layers "
                                    f"(record: {len(reference)} layers, model: {len(self.layers)})")
            for n, ref in reference.items():
                groups = -(-self.layers[n].qweight.numel() // group_bytes)
                if ref.shape != (groups,):
                    raise ArtifactError(f"integrity record for {n!r} has {ref.numel()} groups, expected {groups}")
            self.reference = {n: t.to(torch.int64) for n, t in reference.items()}

    @classmethod
    def from_record(cls, model: nn.Module, record: bytes) -> IntegrityGuard:
        """A guard judging `model` against an `integrity.safetensors` record (key and checksums)."""
        key, group_bytes, ref = read_record(record)
        return cls(model, key, group_bytes, reference=ref)

    def _checksums(self, name: str) -> torch.Tensor:
        return _group_checksums(self.layers[name].qweight, self.key, name, self.group_bytes, self._weights)

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


_META = ("__scheme__", "__key__", "__group_bytes__")
_CODE_DTYPES = {"U8": torch.uint8, "I8": torch.int8}


def make_record(checksums: dict[str, torch.Tensor], key: bytes, group_bytes: int) -> bytes:
    meta = {"__scheme__": torch.tensor(list(SCHEME.encode()), dtype=torch.uint8),
            "__key__": torch.tensor(list(key), dtype=torch.uint8),
            "__group_bytes__": torch.tensor([group_bytes], dtype=torch.int64)}
    return st_save({**meta, **{n: t.contiguous() for n, t in checksums.items()}})


def read_record(data: bytes) -> tuple[bytes, int, dict[str, torch.Tensor]]:
    """(key, group_bytes, checksums per layer) from an integrity record; ArtifactError if malformed."""
    try:
        t = st_load(data)
        scheme = bytes(t.pop("__scheme__").tolist()).decode()
        key = bytes(t.pop("__key__").tolist())
        gb = int(t.pop("__group_bytes__")[0])
    except Exception as e:  # noqa: BLE001 - any parse failure is a malformed record
        raise ArtifactError(f"{INTEGRITY_NAME} is malformed ({type(e).__name__}: {e})") from None
    if scheme != SCHEME or len(key) < 16 or gb < 1:
        raise ArtifactError(f"{INTEGRITY_NAME}: unknown scheme {scheme!r} or bad key / group size")
    return key, gb, t


def record_for_weights(weights_file: str | Path, key: bytes | None = None,
                       group_bytes: int = DEFAULT_GROUP_BYTES) -> bytes:
    """An integrity record for the packed codes (`<layer>.qweight`) in an artifact's model.safetensors,
    under `key` (a fresh random 256-bit key by default), without rebuilding the model."""
    buf = io.BytesIO()
    write_record_for_weights(weights_file, buf, key, group_bytes)
    return buf.getvalue()


def write_record_for_weights(weights_file: str | Path, dst, key: bytes | None = None,
                             group_bytes: int = DEFAULT_GROUP_BYTES) -> None:
    """`record_for_weights` written to `dst` (a path, or a seekable binary file) in memory that does
    not grow with the model: each layer's checksums are written at their place in the safetensors
    layout (known up front from the shapes) as soon as they are computed.

    The codes are read in chunks with plain reads, not through safe_open's memory map: mapped
    pages count in the sealing process's resident memory, which would grow with the model.
    """
    key = key or os.urandom(32)
    with safe_open(str(weights_file), "pt") as f:  # validates the file and its header
        names = [k for k in f.keys() if k.endswith(".qweight") and k not in _META]
    if not names:
        raise ArtifactError(f"{weights_file} holds no quantized weights to protect")
    with open(weights_file, "rb") as fh:
        header_len = int.from_bytes(fh.read(8), "little")
        header = json.loads(fh.read(header_len))
        numel = {k: math.prod(header[k]["shape"]) for k in names}
        # the record's layout: int64 tensors first (8-byte aligned), then the uint8 ones
        scheme, layout, off = list(SCHEME.encode()), {}, 0
        entries = [("__group_bytes__", "I64", 1, 8)]
        entries += [(k[: -len(".qweight")], "I64", -(-numel[k] // group_bytes), 8) for k in names]
        entries += [("__key__", "U8", len(key), 1), ("__scheme__", "U8", len(scheme), 1)]
        for name, dtype, n, size in entries:
            layout[name] = {"dtype": dtype, "shape": [n], "data_offsets": [off, off + n * size]}
            off += n * size
        head = json.dumps(layout, separators=(",", ":")).encode()
        head += b" " * (-len(head) % 8)
        base = 8 + len(head)
        own = not hasattr(dst, "write")
        out = open(dst, "wb") if own else dst  # noqa: SIM115 - closed below
        lock = threading.Lock()

        def put(name: str, data: bytes) -> None:
            with lock:
                out.seek(base + layout[name]["data_offsets"][0])
                out.write(data)

        def one(k: str) -> None:
            info, name = header[k], k[: -len(".qweight")]
            if info["dtype"] not in _CODE_DTYPES:  # not byte codes: element-wise, as the guard does
                with safe_open(str(weights_file), "pt") as f:
                    sums = _group_checksums_chunked(f.get_tensor(k), key, name, group_bytes)
            else:
                start = 8 + header_len + info["data_offsets"][0]
                dt = _CODE_DTYPES[info["dtype"]]

                def read(a: int, b: int) -> torch.Tensor:
                    if b <= a:
                        return torch.empty(0, dtype=dt)
                    return torch.frombuffer(bytearray(os.pread(fh.fileno(), b - a, start + a)), dtype=dt)

                sums = _group_checksums_chunked((read, numel[k]), key, name, group_bytes)
            put(name, sums.numpy().astype("<i8", copy=False).tobytes())

        try:
            out.write(len(head).to_bytes(8, "little") + head)
            put("__group_bytes__", group_bytes.to_bytes(8, "little", signed=True))
            put("__key__", key)
            put("__scheme__", bytes(scheme))
            # layers are independent (one key stream each) and torch releases the GIL: use the cores
            with ThreadPoolExecutor(max(1, min(len(names), os.cpu_count() or 1, 4))) as ex:
                list(ex.map(one, names))
        finally:
            if own:
                out.close()
