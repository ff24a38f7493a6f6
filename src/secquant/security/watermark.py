"""Keyed owner watermark in the rounding decisions of quantized integer weights.

A secret key file gives, through HKDF and a ChaCha20 key stream (`cryptography`), one pseudo-random
32-bit word per weight element of every uniform-integer quantized layer: its low bit is the keyed
target bit, the rest selects the element into the keyed set (all elements by default). At embedding
time, with the float weights at hand, each keyed element whose real position u = w / scale + zero_point
in code space lies within `tau` of a rounding boundary (fractional part near 1/2) gets whichever of
floor(u) / ceil(u) has code parity equal to its keyed bit. The extra error is at most 2*tau of a step
on the changed elements (a fraction of about tau of them). Then, per qparam granule, as many unmarked
elements nearest a boundary are re-rounded the other way as cancel the granule's net code shift
(`balance`): their parity carries no mark, and the mean weight shift, the first-order effect on the
outputs, goes back to zero (it halves the accuracy cost on digits).

Why all elements are keyed by default: with a keyed share p and band tau, z ~ 2*tau*sqrt(p*N) while the
added squared error ~ p*N*tau^2, so the cost of a given z is the same for every split; keying all
elements gives the narrowest band (weights moved least), and the key still hides which ones carry bits.

Verification reads only the integer codes: over all keyed elements, count code parity == keyed bit.
On a model not marked with this key the bits are independent of the codes, so the count is exactly
Binomial(n, 1/2) (up to the PRF assumption on ChaCha20); the one-sided binomial tail is the
probability that an unmarked model scores at least as high, i.e. the false-positive probability of
this verdict. A mark lifts the match rate to about 1/2 + f/2 (f: marked fraction), z ~ f * sqrt(n).

`tau` is chosen per model from a target strength (expected z) unless given: the smallest boundary
band holding strength * sqrt(n) keyed elements, so a large model pays a tiny tau and a small model a
larger one. Marks sit on exact integer codes, so re-quantizing the dequantized model with the same
recipe rounds them back; fine-tuning keeps them while weights move less than half a step (and the
re-quantized scales stay close), which the bench measures.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import nn

from ..errors import ArtifactError, SecquantError
from ..quant.modules import QuantizedWeightMixin
from ..quant.primitives import dequantize, pack, qrange, unpack
from .keys import _write_new
from .watermark_params import DEFAULT_STRENGTH, DEFAULT_THRESHOLD

SCHEME = "secquant.watermark.parity.v1"
MAX_TAU = 0.25
MIN_KEY_BYTES = 32


class WatermarkError(SecquantError):
    """A watermark key is missing or malformed, or a model cannot carry or be checked for a mark."""


@dataclass
class WatermarkKey:
    """The secret key material (derived with HKDF from a key file's bytes) and a public fingerprint."""

    secret: bytes = field(repr=False)

    @property
    def commitment(self) -> str:
        """A public commitment to the key (HMAC-SHA256 of a fixed label, hex): publish or sign it when
        marking, and the key shown later at verification can be matched to it; it reveals nothing of the key."""
        return hmac.new(self.secret, b"secquant.watermark.commitment", hashlib.sha256).hexdigest()

    @property
    def key_id(self) -> str:
        """A short non-secret name for the key in reports: the commitment's first 16 hex digits."""
        return self.commitment[:16]

    def layer_words(self, name: str, numel: int) -> torch.Tensor:
        """One keyed pseudo-random 32-bit word per element of layer `name` (int64 in [0, 2^32))."""
        sub = HKDF(hashes.SHA256(), 32, salt=None, info=f"{SCHEME}/layer/{name}".encode()).derive(self.secret)
        enc = Cipher(algorithms.ChaCha20(sub, bytes(16)), mode=None).encryptor()
        stream = enc.update(bytes(4 * numel))
        return torch.from_numpy(np.frombuffer(stream, dtype="<u4").astype(np.int64))  # same words on any host


def as_key(key: WatermarkKey | bytes | str | Path) -> WatermarkKey:
    """A WatermarkKey from a key file path, raw key bytes (>= 32), or a WatermarkKey."""
    if isinstance(key, WatermarkKey):
        return key
    if isinstance(key, (str, Path)):
        p = Path(key)
        if not p.is_file():
            raise WatermarkError(f"watermark key file {p} does not exist: create one with "
                                 "`secquant watermark keygen --out FILE`")
        raw = p.read_bytes()
        where = str(p)
    else:
        raw, where = bytes(key), "the key"
    if len(raw) < MIN_KEY_BYTES:
        raise WatermarkError(f"{where} holds {len(raw)} bytes; a watermark key needs at least {MIN_KEY_BYTES} "
                             "random bytes: create one with `secquant watermark keygen --out FILE`")
    # Any file of enough random bytes works (e.g. an existing secret): HKDF binds it to this use.
    return WatermarkKey(HKDF(hashes.SHA256(), 32, salt=None, info=SCHEME.encode()).derive(raw))


def keygen(out: str | Path) -> Path:
    """Write a new watermark key file (32 random bytes as hex, mode 0600); never overwrites."""
    p = Path(out)
    if p.exists():
        raise WatermarkError(f"refusing to overwrite {p}: choose another --out")
    p.parent.mkdir(parents=True, exist_ok=True)
    _write_new(p, (secrets.token_hex(32) + "\n").encode(), 0o600)
    return p


def _keyed(words: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(selected mask, target bit) from the keyed words."""
    bits = words & 1
    if fraction >= 1.0:
        return torch.ones_like(bits, dtype=torch.bool), bits
    return (words >> 1) < int(fraction * 2**31), bits


def _check_fraction(fraction: float) -> None:
    if not 0.0 < fraction <= 1.0:
        raise WatermarkError(f"keyed fraction must be in (0, 1], got {fraction}")


def int_layers(model: nn.Module) -> dict[str, QuantizedWeightMixin]:
    """Quantized layers with uniform integer codes (the ones that can carry the mark)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedWeightMixin)
            and m.weight_args is not None and m.weight_args.format == "int"}


def _float_weight(mod: nn.Module, name: str) -> torch.Tensor:
    """The float weight a layer computes with, [out, ...] (a quantized layer's dequantized weight with its
    smoothing and rotation undone; a Hugging Face Conv1D's [in, out] weight transposed)."""
    if isinstance(mod, QuantizedWeightMixin) and mod.weight_args is not None:
        return mod.float_weight()
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise WatermarkError(f"the model's {name!r} has no weight: pass the model this one was quantized from")
    w = w.detach().float()
    return w.t() if type(mod).__name__ == "Conv1D" else w


def _float_position(m: QuantizedWeightMixin, fmod: nn.Module, name: str) -> torch.Tensor:
    """u = w / scale + zero_point in layer m's code space of the float weight `fmod` computes with, [rows, cols]."""
    w = _float_weight(fmod, name)
    if w.numel() != m.rows * m.cols:
        raise WatermarkError(f"the float model's {name!r} has shape {tuple(w.shape)}, the quantized layer "
                             f"{m.weight_shape}: pass the float model this one was quantized from")
    w = m.weight_space(w.reshape(m.rows, m.cols))  # the codes quantize W s R (smoothing, rotation)
    gran = m.weight_args.granule()
    ones = torch.ones(m.rows, m.cols)
    zeros = torch.zeros_like(m.weight_scale)
    scale = dequantize(ones, m.weight_scale, zeros, gran)
    zp = dequantize(ones, m.weight_zero_point.float(), zeros, gran)
    return w.double() / scale.double() + zp.double()


def _granule_index(m: QuantizedWeightMixin) -> torch.Tensor:
    """The index of the qparam granule (tensor, channel or group) of each element, [rows, cols]."""
    a = m.weight_args
    rows, cols = torch.arange(m.rows)[:, None], torch.arange(m.cols)[None, :]
    if a.granularity == "tensor":
        return torch.zeros(m.rows, m.cols, dtype=torch.int64)
    if a.granularity == "channel":
        return (rows if a.axis in (0, -2) else cols).expand(m.rows, m.cols).clone()
    ngroups = math.ceil(m.cols / a.group_size)
    return rows * ngroups + cols // a.group_size


def _balance(m: QuantizedWeightMixin, codes: torch.Tensor, new: torch.Tensor, lo: torch.Tensor,
             free: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
    """Cancel each granule's net code shift from marking by re-rounding as many unmarked elements the other
    way, cheapest first (those nearest a boundary). Their parity carries no mark (it matches a keyed bit
    with probability 1/2 either way), so detection is unchanged while the mean weight shift per granule,
    the first-order effect on outputs, goes back to zero."""
    g = _granule_index(m)
    shift = torch.zeros(int(g.max()) + 1, dtype=torch.int64).index_add_(0, g.reshape(-1), (new - codes).reshape(-1))
    sg = shift[g]
    cand = free & (((codes == lo + 1) & (sg > 0)) | ((codes == lo) & (sg < 0)))
    idx = cand.reshape(-1).nonzero().flatten()
    if idx.numel() == 0:
        return new
    gi = g.reshape(-1)[idx]
    order = torch.argsort(gi.double() * 2 + dist.reshape(-1)[idx])  # by granule, then cheapest
    idx, gi = idx[order], gi[order]
    _, counts = torch.unique_consecutive(gi, return_counts=True)
    starts = torch.repeat_interleave(torch.cumsum(counts, 0) - counts, counts)
    take = idx[(torch.arange(idx.numel()) - starts) < shift[gi].abs()]
    out = new.reshape(-1).clone()
    c = codes.reshape(-1)[take]
    out[take] = torch.where(c == lo.reshape(-1)[take], c + 1, c - 1)
    return out.reshape(new.shape)


@dataclass
class EmbedReport:
    """What embedding did: the band used and how many elements were keyed, eligible and changed."""

    scheme: str
    key_id: str
    commitment: str
    tau: float
    fraction: float
    layers: int
    keyed: int
    marked: int  # keyed elements within tau of a boundary: set to the keyed parity
    changed: int  # of those, the ones whose code changed
    balanced: int  # unmarked elements re-rounded the other way to cancel each granule's net shift
    expected_z: float
    skipped_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def embed_watermark(qmodule: nn.Module, float_module: nn.Module, key: WatermarkKey | bytes | str | Path, *,
                    tau: float | None = None, strength: float = DEFAULT_STRENGTH,
                    fraction: float = 1.0, balance: bool = True) -> EmbedReport:
    """Mark `qmodule` in place from the float weights it was quantized from.

    `tau` (in steps, 0 < tau <= 0.5): half-width of the band around a rounding boundary whose keyed
    elements are set to the keyed parity; by default the smallest band giving expected z = `strength`
    (capped at 0.25). `fraction`: share of elements in the keyed set (1.0: all). `balance`: cancel the
    net code shift per granule with unmarked elements (see _balance; halves the accuracy cost on digits).
    """
    k = as_key(key)
    _check_fraction(fraction)
    if tau is not None and not 0.0 < tau <= 0.5:
        raise WatermarkError(f"tau must be in (0, 0.5] (steps from the rounding boundary), got {tau}")
    layers = int_layers(qmodule)
    skipped = sorted(n for n, m in qmodule.named_modules() if isinstance(m, QuantizedWeightMixin)
                     and m.weight_args is not None and m.weight_args.format != "int")
    if not layers:
        raise WatermarkError("the model has no uniform-integer quantized layer to carry a watermark: quantize "
                             "it with an integer preset (e.g. w8a8, w4a16) first")
    plans = {}
    keyed_total = 0
    for name, m in layers.items():
        try:
            fmod = float_module.get_submodule(name)
        except AttributeError:
            raise WatermarkError(f"the float model has no layer {name!r}: pass the float model this one was "
                                 "quantized from") from None
        u = _float_position(m, fmod, name)
        codes = m.weight_codes().to(torch.int64)
        sel, bits = _keyed(k.layer_words(name, m.rows * m.cols).reshape(m.rows, m.cols), fraction)
        lo = torch.floor(u).to(torch.int64)
        qmin, qmax = qrange(m.weight_args.bits, m.weight_args.is_signed)
        # Only elements whose stored code is floor(u) or ceil(u) (RTN, and GPTQ where it stayed next to
        # u), both inside the code range; nothing is moved further than to the other side of u.
        near = ((codes == lo) | (codes == lo + 1)) & (lo >= 0) & (lo + 1 <= qmax - qmin)
        dist = (u - lo - 0.5).abs().float()
        plans[name] = (m, codes, bits, lo, sel & near, near, dist)
        keyed_total += int(sel.sum())
    if tau is None:
        all_d = torch.cat([p[6][p[4]] for p in plans.values()])
        want = math.ceil(strength * math.sqrt(keyed_total))
        if all_d.numel() == 0:
            tau = MAX_TAU
        else:
            kth = min(want, all_d.numel())
            tau = min(MAX_TAU, float(torch.kthvalue(all_d, kth).values))
            tau = max(tau, 1e-6)
    marked = changed = balanced = 0
    for m, codes, bits, lo, ok, near, dist in plans.values():
        band = ok & (dist <= tau)
        target = torch.where((lo & 1) == bits, lo, lo + 1)
        new = torch.where(band, target, codes)
        marked += int(band.sum())
        changed += int((new != codes).sum())
        if balance:
            done = new
            new = _balance(m, codes, new, lo, near & ~band, dist)
            balanced += int((new != done).sum())
        m.qweight.copy_(pack(new.reshape(-1), m.weight_args.bits))
        m._w_cache = None  # the mixin's dequantized-weight cache is stale after a direct code edit
    return EmbedReport(SCHEME, k.key_id, k.commitment, float(tau), fraction, len(layers), keyed_total, marked, changed, balanced,
                       marked / math.sqrt(keyed_total) if keyed_total else 0.0, skipped)


@dataclass
class VerifyReport:
    """The verdict. `matches`/`n`/`z`: code parity == keyed bit over all keyed elements; `p_value`: the
    false-positive probability of this score, Bonferroni-combined over the whole-model test and one test
    per layer (a layer whose scales a re-quantization re-searched loses its marks, the others keep theirs)."""

    scheme: str
    key_id: str
    detected: bool
    matches: int
    n: int
    match_rate: float
    z: float
    p_value: float
    log10_p_value: float
    threshold: float
    tests: int
    layers: dict[str, dict]
    skipped_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["false_positive_probability"] = self.p_value  # P(a model not marked with this key scores this high)
        return d


def binomial_tail(matches: int, n: int) -> tuple[float, float]:
    """(P[X >= matches], log10 of it) for X ~ Binomial(n, 1/2), exact (scipy), the log kept past underflow."""
    from scipy.special import logsumexp
    from scipy.stats import binom

    if matches <= 0:
        return 1.0, 0.0
    p = float(binom.sf(matches - 1, n, 0.5))
    if p > 0.0:
        return p, math.log10(p)
    # Underflow: beyond the mean the terms fall geometrically, so a window of them carries the sum.
    ks = torch.arange(matches, min(n, matches + 200_000) + 1).numpy()
    return 0.0, float(logsumexp(binom.logpmf(ks, n, 0.5))) / math.log(10)


def _codes_of_module(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for name, m in int_layers(model).items():
        yield name, m.weight_codes().reshape(-1)


def _codes_of_artifact(d: Path) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """Codes of the integer layers read straight from an artifact directory (hashes checked first)."""
    from safetensors import safe_open

    from ..artifact.manifest import WEIGHTS_NAME
    from ..artifact.checks import verify_artifact_dir

    manifest = verify_artifact_dir(d)
    out, skipped = [], []
    with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
        names = set(f.keys())
        for name, entry in manifest.layers.items():
            a = entry.weight.args
            if a is None:
                continue
            if a.format != "int":
                skipped.append(name)
                continue
            if f"{name}.qweight" not in names:
                raise ArtifactError(f"{d}: layer {name!r} has no packed codes ({name}.qweight) in {WEIGHTS_NAME}")
            numel = math.prod(entry.weight.shape)
            out.append((name, unpack(f.get_tensor(f"{name}.qweight"), a.bits, numel).reshape(-1)))
    return out, skipped


def _as_module(model) -> nn.Module:
    """A module from a module, a QuantizedModel (.module) or an artifact directory (rebuilt, hashes checked)."""
    module = getattr(model, "module", model)
    if isinstance(module, nn.Module):
        return module
    from ..models import load_artifact

    d = Path(model)
    if not d.is_dir():
        raise WatermarkError(f"{d} is not an artifact directory")
    return load_artifact(d).module


def _codes_on_reference_grid(model, reference) -> tuple[list[tuple[str, torch.Tensor]], list[str]]:
    """The suspect's weights rounded onto the marked reference's grid (its scales, zero points, smoothing)."""
    ref, sus = _as_module(reference), _as_module(model)
    items, skipped = [], []
    for name, r in int_layers(ref).items():
        try:
            mod = sus.get_submodule(name)
            u = _float_position(r, mod, name)
        except (AttributeError, WatermarkError):
            skipped.append(name)
            continue
        qmin, qmax = qrange(r.weight_args.bits, r.weight_args.is_signed)
        items.append((name, torch.round(u).clamp(0, qmax - qmin).to(torch.int64).reshape(-1)))
    return items, skipped


def verify_watermark(model: nn.Module | str | Path, key: WatermarkKey | bytes | str | Path, *,
                     threshold: float = DEFAULT_THRESHOLD, fraction: float = 1.0,
                     reference: nn.Module | str | Path | None = None) -> VerifyReport:
    """Test a quantized model (module, or artifact directory read without rebuilding) for the key's mark.

    Detected iff the one-sided binomial p-value is <= `threshold`: on any model not marked with this
    key, the probability of a detection is at most `threshold`.

    `reference`: the owner's marked model (module or artifact directory). The suspect's weights (quantized
    with any scales, or even float) are then rounded onto the reference's grid before the parity test, which
    undoes a re-quantization that re-searched scales. The null stays exact: the reference's grid was fixed
    before marking, so it does not depend on the key.
    """
    k = as_key(key)
    _check_fraction(fraction)
    if not 0.0 < threshold < 0.5:
        raise WatermarkError(f"threshold must be a probability in (0, 0.5), got {threshold}")
    module = getattr(model, "module", model)  # a QuantizedModel or a bare module
    if reference is not None:
        items, skipped = _codes_on_reference_grid(model, reference)
    elif isinstance(module, nn.Module):
        items = list(_codes_of_module(module))
        skipped = sorted(n for n, m in module.named_modules() if isinstance(m, QuantizedWeightMixin)
                         and m.weight_args is not None and m.weight_args.format != "int")
    else:
        d = Path(model)
        if not d.is_dir():
            raise WatermarkError(f"{d} is not an artifact directory (sealed files: open them first, or use "
                                 "`secquant watermark verify FILE --identity ... --verify-key ...`)")
        items, skipped = _codes_of_artifact(d)
    if not items:
        raise WatermarkError("the model has no uniform-integer quantized layer (or, with a reference, none of the "
                             "reference's layers): nothing can carry a watermark")
    per_layer: dict[str, dict] = {}
    matches = n = 0
    for name, codes in items:
        sel, bits = _keyed(k.layer_words(name, codes.numel()), fraction)
        hit = int(((codes.to(torch.int64) & 1) == bits)[sel].sum())
        cnt = int(sel.sum())
        per_layer[name] = {"matches": hit, "n": cnt, "z": _z(hit, cnt), "log10_p_value": binomial_tail(hit, cnt)[1]}
        matches += hit
        n += cnt
    # One whole-model test and one per layer; the union bound makes min p times the number of tests a
    # valid false-positive probability (each test is exact: bits are independent of the codes under H0).
    tests = 1 + len(per_layer)
    best = min([binomial_tail(matches, n)[1]] + [v["log10_p_value"] for v in per_layer.values()])
    log10p = min(0.0, best + math.log10(tests))
    p = 10.0 ** log10p
    return VerifyReport(SCHEME, k.key_id, log10p <= math.log10(threshold), matches, n, matches / n if n else 0.0,
                        _z(matches, n), p, log10p, threshold, tests, per_layer, skipped)


def _z(matches: int, n: int) -> float:
    return (2 * matches - n) / math.sqrt(n) if n else 0.0


@torch.no_grad()
def dequantized_float(float_module: nn.Module, qmodule: nn.Module) -> nn.Module:
    """A copy of the float model whose quantized layers hold the quantized model's dequantized weights
    (smoothing undone): what someone holding only the quantized model can re-quantize or fine-tune."""
    import copy

    out = copy.deepcopy(float_module)
    for name, m in qmodule.named_modules():
        if not isinstance(m, QuantizedWeightMixin) or m.weight_args is None:
            continue
        fmod = out.get_submodule(name)
        w = _float_weight(m, name)
        if type(fmod).__name__ == "Conv1D":
            w = w.t()
        fmod.weight.data.copy_(w.reshape(fmod.weight.shape))
    return out


__all__ = [
    "DEFAULT_STRENGTH",
    "DEFAULT_THRESHOLD",
    "SCHEME",
    "EmbedReport",
    "VerifyReport",
    "WatermarkError",
    "WatermarkKey",
    "as_key",
    "binomial_tail",
    "dequantized_float",
    "embed_watermark",
    "int_layers",
    "keygen",
    "verify_watermark",
]
