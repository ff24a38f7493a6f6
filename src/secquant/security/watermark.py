"""Keyed spread-spectrum owner watermark in the rounding directions of quantized integer weights.

Embedding. A secret key gives, through HKDF and a ChaCha20 key stream (`cryptography`), one pseudo-random sign
k = +-1 per weight element of every uniform-integer quantized layer. With the float weights W at hand, an element's
real position u = T(W) / scale + zero_point in code space (T: the layer's smoothing and rotation) lies between
floor(u) and ceil(u). Each element within `tau` of the rounding boundary is rounded toward its sign (ceil for +1,
floor for -1). The mark is a keyed bias of the rounding *direction* relative to the float weight: about tau * N
elements move one step toward k, each at most 2 tau step^2 further from u, so the weight MSE grows by about tau^2
step^2 (12 tau^2 relative to the rounding noise). (Cancelling each granule's net code shift with extra elements
re-rounded the other way was tried: it doubled the added MSE and the cosine cost on MiniLM w4a16.)

Detection is non-blind: it needs the owner's float weights and grid (scales, zero points, smoothing, rotation: the
owner's marked artifact, or the suspect's own when it is that artifact). The suspect's weights, whatever format
they are in, are mapped onto that grid; d = u_suspect - u_float is correlated with k. With d clipped at 4 robust
sds of its row and inverse-variance weights per row, a = d / max(mean_row(d^2), 1/12), the statistic is
z = sum(k a) / sqrt(sum(a^2)).

The p-value is a conservative false-positive bound with no model of the noise: on a model not marked with this key,
the signs are independent of d (the PRF assumption on ChaCha20), so given d, sum(k a) is a weighted sum of
Rademacher signs, and P(z >= x) <= min(exp(-x^2 / 2) [Hoeffding], c * P(N(0,1) >= x) [Bentkus and Dzindzalieta
2015, optimal c = 1 / (4 P(N(0,1) >= sqrt 2)) = 3.1787]) for any d, whatever produced it.

Why an attack without the key fails: noise independent of k (+-1 on codes, Gaussian noise, re-rounding onto another
grid, fine-tuning) only adds to sum(a^2); the signal grows like tau * N and the noise like sqrt(N), so
z ~ tau * sqrt(N / (1/12 + noise variance in steps^2)). Reparametrizations that leave the function unchanged are
undone before scoring, against the float weights: permutations of hidden units (layers up to 4,096 units a side)
and per-row and per-column signed scales (which ReLU and BatchNorm allow). NaN, inf and a few planted huge values
(free where a unit never fires or a token is never used) are neutralized rather than trusted. Not handled:
distillation into another model, permutations in wider layers (e.g. embedding tables: too many rows to match), and
noise large enough to cost the accuracy the owner cares about (the bench measures where that is).
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch import nn

from ..errors import SecquantError
from ..quant.algorithms.fold import fold_into_rows
from ..quant.modules import QuantizedWeightMixin
from ..quant.primitives import dequantize, qrange
from .keys import _write_new
from .watermark_align import align_units
from .watermark_params import DEFAULT_MAX_TAU, DEFAULT_STRENGTH, DEFAULT_THRESHOLD, MAX_TAU

SCHEME = "secquant.watermark.spread.v2"
OLD_SCHEMES = ("secquant.watermark.parity.v1",)
# The key derivation label of the first scheme, kept so that a key file's public commitment (and key id) stays
# the same across scheme versions; the per-layer sign streams are derived under SCHEME.
KEY_LABEL = b"secquant.watermark.parity.v1"
MIN_KEY_BYTES = 32
MIN_ROW_VARIANCE = 1.0 / 12.0  # rounding noise of one step: the floor of the per-row noise estimate
CLIP_SD = 4.0  # residuals beyond this many robust standard deviations of their row are clipped
# Bentkus-Dzindzalieta (Bernoulli 21(2), 2015): P(sum a_i k_i >= x) <= c P(N(0,1) >= x) for sum a_i^2 <= 1, with
# the optimal c = 1 / (4 P(N(0,1) >= sqrt 2)) = 3.178655...; rounded up here.
BD_CONSTANT = 3.17866


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

    def layer_signs(self, name: str, numel: int) -> torch.Tensor:
        """One keyed pseudo-random sign (+1.0 / -1.0, float32) per element of layer `name`."""
        sub = HKDF(hashes.SHA256(), 32, salt=None, info=f"{SCHEME}/signs/{name}".encode()).derive(self.secret)
        enc = Cipher(algorithms.ChaCha20(sub, bytes(16)), mode=None).encryptor()
        bits = np.unpackbits(np.frombuffer(enc.update(bytes((numel + 7) // 8)), dtype=np.uint8),
                             bitorder="little")[:numel]  # same signs on any host
        return torch.from_numpy(bits.astype(np.float32) * 2.0 - 1.0)


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
    return WatermarkKey(HKDF(hashes.SHA256(), 32, salt=None, info=KEY_LABEL).derive(raw))


def keygen(out: str | Path) -> Path:
    """Write a new watermark key file (32 random bytes as hex, mode 0600); never overwrites."""
    p = Path(out)
    if p.exists():
        raise WatermarkError(f"refusing to overwrite {p}: choose another --out")
    p.parent.mkdir(parents=True, exist_ok=True)
    _write_new(p, (secrets.token_hex(32) + "\n").encode(), 0o600)
    return p


# ------------------------------------------------------------------------------------------- geometry


def int_layers(model: nn.Module) -> dict[str, QuantizedWeightMixin]:
    """Quantized layers with uniform integer codes (the ones that can carry the mark)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedWeightMixin)
            and m.weight_args is not None and m.weight_args.format == "int"}


def _non_int_layers(model: nn.Module) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedWeightMixin)
                  and m.weight_args is not None and m.weight_args.format != "int")


def _float_weight(mod: nn.Module, name: str) -> torch.Tensor:
    """The float weight a layer computes with, [out, ...] (a quantized layer's dequantized weight with its
    smoothing and rotation undone; a Hugging Face Conv1D's [in, out] weight transposed)."""
    if isinstance(mod, QuantizedWeightMixin):
        return mod.float_weight()
    w = getattr(mod, "weight", None)
    if not isinstance(w, torch.Tensor):
        raise WatermarkError(f"the model's {name!r} has no weight: pass the model this one was quantized from")
    w = w.detach().float()
    return w.t() if type(mod).__name__ == "Conv1D" else w


def _layer_weight(model: nn.Module, m: QuantizedWeightMixin, name: str) -> torch.Tensor:
    """`model`'s float weight for the owner's layer `name`, as [rows, cols] of that layer."""
    try:
        mod = model.get_submodule(name)
    except AttributeError:
        raise WatermarkError(f"the model has no layer {name!r}: pass the model this one was quantized from") from None
    w = _float_weight(mod, name)
    if not isinstance(mod, QuantizedWeightMixin):  # a float layer: fold its BatchNorm as quantizing did
        try:
            w = fold_into_rows(model, getattr(m, "folded_batchnorm", None), w)
        except ValueError as e:
            raise WatermarkError(f"{e}: pass the model this one was quantized from") from None
    if w.numel() != m.rows * m.cols:
        raise WatermarkError(f"the model's {name!r} has shape {tuple(w.shape)}, the quantized layer "
                             f"{m.weight_shape}: pass the model this one was quantized from")
    return w.reshape(m.rows, m.cols).double()


def _step(m: QuantizedWeightMixin) -> torch.Tensor:
    """Each element's quantization step (its granule's scale), [rows, cols], float64."""
    gran = m.weight_args.granule()
    ones = torch.ones(m.rows, m.cols)
    return dequantize(ones, m.weight_scale, torch.zeros_like(m.weight_scale), gran).double()


def _code_position(m: QuantizedWeightMixin, w: torch.Tensor) -> torch.Tensor:
    """u = T(w) / scale + zero_point: a float weight [rows, cols] in layer m's code space (T: smoothing, rotation)."""
    gran = m.weight_args.granule()
    ones = torch.ones(m.rows, m.cols)
    zp = dequantize(ones, m.weight_zero_point.float(), torch.zeros_like(m.weight_scale), gran).double()
    return m.weight_space(w.double()) / _step(m) + zp


def _store_codes(m: QuantizedWeightMixin, codes: torch.Tensor) -> None:
    """Write unsigned codes back through the layer's own setter (which drops any dequantized cache)."""
    qmin, _ = qrange(m.weight_args.bits, m.weight_args.is_signed)
    m.set_quantized(codes + qmin, m.weight_scale.clone(), m.weight_zero_point.to(torch.int64) + qmin)


@dataclass
class EmbedReport:
    """What embedding did: the band used, how many elements were changed, the fresh mark's z."""

    scheme: str
    key_id: str
    commitment: str
    tau: float
    layers: int
    n: int  # elements of the integer layers (all carry a keyed sign)
    changed: int  # elements within tau of a boundary whose rounding was turned toward their sign
    z: float  # the fresh mark's detection statistic against the float weights
    log10_p_value: float
    skipped_layers: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def record(self) -> dict[str, Any]:
        """The manifest's public watermark record: the key's commitment, never the key."""
        return {"scheme": self.scheme, "key_id": self.key_id, "commitment": self.commitment, "tau": self.tau}


@torch.no_grad()
def embed_watermark(qmodule: nn.Module, float_module: nn.Module, key: WatermarkKey | bytes | str | Path, *,
                    tau: float | None = None, strength: float | None = None) -> EmbedReport:
    """Mark `qmodule` in place from the float weights it was quantized from.

    `tau` (steps, 0 < tau <= 0.5): half-width of the band around the rounding boundary whose elements are
    rounded toward their keyed sign. `strength`: instead of tau, the expected z of the fresh mark
    (tau = strength / sqrt(12 N), at most MAX_TAU). Neither: tau = min(DEFAULT_MAX_TAU, DEFAULT_STRENGTH /
    sqrt(12 N)), so a large model gets z ~ DEFAULT_STRENGTH at a tiny cost and a small one pays at most 12 *
    DEFAULT_MAX_TAU^2 more weight MSE (4.3%) for what its size allows.
    """
    k = as_key(key)
    if tau is not None and strength is not None:
        raise WatermarkError("give tau or strength, not both")
    layers = int_layers(qmodule)
    if not layers:
        raise WatermarkError("the model has no uniform-integer quantized layer to carry a watermark: quantize "
                             "it with an integer preset (e.g. w8a8, w4a16) first")
    n = sum(m.rows * m.cols for m in layers.values())
    if strength is not None:
        if strength <= 0:
            raise WatermarkError(f"strength must be a positive z-score, got {strength}")
        tau = min(MAX_TAU, strength / math.sqrt(12.0 * n))
    elif tau is None:
        tau = min(DEFAULT_MAX_TAU, DEFAULT_STRENGTH / math.sqrt(12.0 * n))
    tau = float(tau)
    if not 0.0 < tau <= MAX_TAU:
        raise WatermarkError(f"tau must be in (0, {MAX_TAU}] (steps from the rounding boundary), got {tau}")
    plans = []
    for name, m in layers.items():  # check every layer against the float model before changing any
        u = _code_position(m, _layer_weight(float_module, m, name))
        plans.append((name, m, u))
    changed = 0
    for name, m, u in plans:
        codes = m.weight_codes().to(torch.int64)
        signs = k.layer_signs(name, m.rows * m.cols).reshape(m.rows, m.cols)
        lo = torch.floor(u).to(torch.int64)
        qmin, qmax = qrange(m.weight_args.bits, m.weight_args.is_signed)
        # Only elements whose stored code is floor(u) or ceil(u) (RTN, and GPTQ where it stayed next to u), both
        # inside the code range: nothing moves further than to the other side of u.
        near = ((codes == lo) | (codes == lo + 1)) & (lo >= 0) & (lo + 1 <= qmax - qmin)
        dist = (u - lo - 0.5).abs()
        band = near & (dist <= tau)
        new = torch.where(band, lo + (signs > 0).to(torch.int64), codes)
        changed += int((new != codes).sum())
        _store_codes(m, new)
    fresh = verify_watermark(qmodule, k, reference=qmodule, float_model=float_module, align=False)
    return EmbedReport(SCHEME, k.key_id, k.commitment, tau, len(layers), n, changed, fresh.z,
                       fresh.log10_p_value, _non_int_layers(qmodule))


# ------------------------------------------------------------------------------------------- the bound


def tail_bound(z: float) -> tuple[float, float]:
    """(p, log10 p): a bound on P(sum k_i a_i >= z * sqrt(sum a_i^2)) for independent uniform signs k_i and ANY
    fixed weights a_i: min(Hoeffding exp(-z^2/2), Bentkus-Dzindzalieta 3.178 P(N(0,1) >= z)), capped at 1. The
    log is kept past double underflow."""
    from scipy.stats import norm

    if not z > 0:
        return 1.0, 0.0
    ln = min(0.0, -z * z / 2.0, math.log(BD_CONSTANT) + float(norm.logsf(z)))
    return math.exp(ln), ln / math.log(10.0)


# ------------------------------------------------------------------------------------------- evidence


def _noise_scales(m: QuantizedWeightMixin) -> tuple[torch.Tensor, torch.Tensor]:
    """(per row, per column) factors that make the owner's rounding noise the same size everywhere in float space:
    a code step moves float element (i, j) by about step_i / s_j, where s_j is the norm of row j of T (T = smoothing
    times an orthogonal rotation: T T^T = diag(s^2)). In float space SmoothQuant-style scales make that up to 1000x
    larger on some input channels (those the activations barely use), which would swamp an unweighted fit."""
    hr = _step(m).pow(-2).mean(1).sqrt()
    hc = m.weight_space(torch.eye(m.cols, dtype=torch.float64)).norm(dim=1)
    return hr, hc


@dataclass
class Evidence:
    """The suspect's weighted residuals on the owner's grid, per layer: what keyed signs are tested against.
    Independent of any key, so one Evidence scores many keys (the bench's false-positive measurement)."""

    a: dict[str, torch.Tensor]  # flat float64 weighted residuals a_i
    layers: dict[str, dict]
    skipped_layers: list[str]
    notes: list[str]


def _resolve(model: Any) -> tuple[nn.Module, Any, nn.Module | None]:
    """(module, manifest or None, in-process float module or None) for a QuantizedModel, a bare module or an
    artifact directory (rebuilt, hashes checked)."""
    module = getattr(model, "module", None)
    if isinstance(module, nn.Module):
        handle = getattr(model, "handle", None)
        src = getattr(handle, "module", None)
        src = src if isinstance(src, nn.Module) and src is not module else None
        return module, getattr(model, "manifest", None), src
    if isinstance(model, nn.Module):
        return model, None, None
    from ..models import load_artifact

    d = Path(model)
    if not d.is_dir():
        raise WatermarkError(f"{d} is not an artifact directory (sealed files: open them first, or use "
                             "`secquant watermark verify FILE --identity ... --verify-key ...`)")
    la = load_artifact(d)
    return la.module, la.manifest, None


def _float_reference(float_model: Any, manifest: Any, in_process: nn.Module | None) -> tuple[nn.Module, bool | None]:
    """The owner's float module and whether it matches the reference manifest's source hash (None: no manifest).
    An explicit float model is used as given (any model independent of the key keeps the bound valid)."""
    from ..artifact import state_dict_sha256

    want = manifest.source.weights_sha256 if manifest is not None else None

    def matches(mod: nn.Module) -> bool | None:
        return None if want is None else state_dict_sha256(mod.state_dict()) == want

    if float_model is not None:
        if isinstance(float_model, (str, Path)):
            from ..models import load_model

            float_model = load_model(str(float_model))
        mod = getattr(float_model, "module", float_model)
        if not isinstance(mod, nn.Module):
            raise WatermarkError("float_model must be a module, a model handle or a model spec")
        return mod.eval(), matches(mod)
    if in_process is not None and matches(in_process):
        return in_process, True
    if manifest is None:
        raise WatermarkError("verification needs the owner's float model (the mark is measured against it): pass "
                             "float_model= (CLI: --float MODEL)")
    spec = manifest.model.spec
    from ..models import BUILTINS, load_model

    if spec not in BUILTINS:  # nothing a manifest names is imported, called or opened (SECURITY.md)
        raise WatermarkError(f"the reference artifact was quantized from {spec[:120]!r}, which is not a built-in: "
                             "secquant never imports or opens what a manifest names, so pass the owner's float "
                             "model yourself: --float MODEL (and --weights FILE for a factory; API: float_model=)")
    try:
        h = load_model(spec)
    except SecquantError as e:
        raise WatermarkError(f"cannot rebuild the float model {spec!r} named by the reference artifact ({e}): "
                             "pass it with --float MODEL (and --weights)") from None
    if not matches(h.module):
        raise WatermarkError(f"{spec} no longer matches the float weights the reference was quantized from "
                             "(source hash differs): pass the owner's float model with --float MODEL")
    return h.module.eval(), True


def _check_scheme(manifest: Any) -> None:
    rec = getattr(manifest, "watermark", None) if manifest is not None else None
    if rec and rec.get("scheme") in OLD_SCHEMES:
        raise WatermarkError(
            f"the reference artifact was marked with the old scheme {rec['scheme']} (code parity), which changing "
            f"half the codes by +-1 removes and this version no longer verifies: re-embed the mark with `secquant "
            f"watermark embed` ({SCHEME}), or pass the owner's current marked artifact with --reference")


def _weighted(d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, per-row noise sd): residuals d [rows, cols] clipped at CLIP_SD robust standard deviations of their row
    (median absolute deviation), then divided by the row's variance of the clipped values, floored at one step's
    rounding noise (inverse-variance weights: rows the attack made noisier count less). The clipping keeps a few
    planted huge values, where they cost nothing, from silencing a row. A function of d only: the bound holds."""
    dev = (d - d.median(1, keepdim=True).values).abs()
    lim = CLIP_SD * 1.4826 * dev.median(1, keepdim=True).values.clamp(min=math.sqrt(MIN_ROW_VARIANCE) / 1.4826)
    d = torch.maximum(torch.minimum(d, lim), -lim)
    var = d.pow(2).mean(1, keepdim=True).clamp(min=MIN_ROW_VARIANCE)
    return d / var, var.sqrt().reshape(-1)


@torch.no_grad()
def collect_evidence(model: Any, *, reference: Any = None, float_model: Any = None, align: bool = True) -> Evidence:
    """The suspect's residuals against the owner's float weights, on the owner's grid, weighted per row.

    `model`: the suspect (QuantizedModel, module quantized in any format or float, artifact directory).
    `reference`: the owner's marked model (same kinds): its grid and integer layers; default the suspect itself.
    `float_model`: the owner's float model (module, handle, spec); default the one named by the reference's
    manifest (checked against its source hash). `align`: undo per-row/column signed scale changes first.
    """
    sus, sus_manifest, sus_src = _resolve(model)
    if reference is None:
        ref, manifest, src = sus, sus_manifest, sus_src
    else:
        ref, manifest, src = _resolve(reference)
    _check_scheme(manifest)
    layers = int_layers(ref)
    if not layers:
        raise WatermarkError("the reference has no uniform-integer quantized layer, so nothing can carry a "
                             "watermark: pass the owner's marked artifact with --reference")
    fmod, source_ok = _float_reference(float_model, manifest, src)
    notes = [] if source_ok is not False else ["the float model differs from the reference's recorded source"]
    out: dict[str, torch.Tensor] = {}
    info: dict[str, dict] = {}
    skipped = _non_int_layers(ref)
    for name, m in layers.items():
        wf = _layer_weight(fmod, m, name)
        try:
            ws = _layer_weight(sus, m, name)
        except WatermarkError:
            skipped.append(name)
            continue
        finite = torch.isfinite(ws)
        entry: dict[str, Any] = {"n": m.rows * m.cols, "not_finite": int((~finite).sum())}
        ws = torch.where(finite, ws, wf)  # NaN or inf carries no evidence: read it as the float weight (d = 0)
        if align:
            ws, entry["align"] = align_units(ws, wf, *_noise_scales(m))
        d = m.weight_space(ws - wf) / _step(m)  # u_suspect - u_float in steps (T is linear)
        a, sd = _weighted(d)
        entry["noise_rms_steps"] = float(d.pow(2).mean().sqrt())
        entry["noise_row_median_steps"] = float(sd.median())
        out[name] = a.reshape(-1)
        info[name] = entry
    if not out:
        raise WatermarkError("the suspect has none of the reference's integer layers (or all differ in shape): "
                             "pass the model the reference was quantized from")
    return Evidence(out, info, sorted(skipped), notes)


@dataclass
class VerifyReport:
    """The verdict: z = sum(k a) / sqrt(sum a^2) over all reference layers, and `p_value`, a bound on the
    probability that a model not marked with this key scores at least z (see tail_bound)."""

    scheme: str
    key_id: str
    detected: bool
    z: float
    p_value: float
    log10_p_value: float
    threshold: float
    n: int
    layers: dict[str, dict]
    skipped_layers: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bound: str = "min(Hoeffding, Bentkus-Dzindzalieta) tail of a weighted Rademacher sum"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["false_positive_probability"] = self.p_value  # P(a model not marked with this key scores this high)
        return d


def _check_threshold(threshold: float) -> None:
    if not 0.0 < threshold < 0.5:
        raise WatermarkError(f"threshold must be a probability in (0, 0.5), got {threshold}")


def score(evidence: Evidence, key: WatermarkKey | bytes | str | Path,
          threshold: float = DEFAULT_THRESHOLD) -> VerifyReport:
    """Test the evidence for one key's signs."""
    k = as_key(key)
    _check_threshold(threshold)
    s_tot = v_tot = 0.0
    n = 0
    layers = {}
    for name, a in evidence.a.items():
        signs = k.layer_signs(name, a.numel()).double()
        s, v = float(signs @ a), float(a @ a)
        s_tot, v_tot, n = s_tot + s, v_tot + v, n + a.numel()
        layers[name] = {**evidence.layers[name], "z": s / math.sqrt(v) if v > 0 else 0.0}
    z = s_tot / math.sqrt(v_tot) if v_tot > 0 else 0.0
    p, log10p = tail_bound(z)
    return VerifyReport(SCHEME, k.key_id, log10p <= math.log10(threshold), z, p, log10p, threshold, n, layers,
                        evidence.skipped_layers, evidence.notes)


def verify_watermark(model: Any, key: WatermarkKey | bytes | str | Path, *, reference: Any = None,
                     float_model: Any = None, threshold: float = DEFAULT_THRESHOLD, align: bool = True) -> VerifyReport:
    """Test a suspect model for the key's mark against the owner's float weights (see collect_evidence).

    Detected iff the p-value bound is <= `threshold`: on any model not marked with this key, whatever was done
    to it, the probability of a detection is at most `threshold`.
    """
    k = as_key(key)  # a bad key or threshold fails before any work
    _check_threshold(threshold)
    return score(collect_evidence(model, reference=reference, float_model=float_model, align=align), k, threshold)


@torch.no_grad()
def dequantized_float(float_module: nn.Module, qmodule: nn.Module) -> nn.Module:
    """A copy of the float model whose quantized layers hold the quantized model's dequantized weights
    (smoothing undone): what someone holding only the quantized model can re-quantize or fine-tune."""
    import copy

    out = copy.deepcopy(float_module)
    # every other tensor as the quantized model holds it: biases, and a BatchNorm folded into the layer before it
    # (quant.algorithms.fold), which the quantized model keeps as an exact identity
    held = qmodule.state_dict()
    with torch.no_grad():
        for key, t in out.state_dict().items():
            src = held.get(key)
            if src is not None and src.shape == t.shape and src.dtype == t.dtype:
                t.copy_(src)
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
    "DEFAULT_MAX_TAU",
    "DEFAULT_STRENGTH",
    "DEFAULT_THRESHOLD",
    "SCHEME",
    "EmbedReport",
    "Evidence",
    "VerifyReport",
    "WatermarkError",
    "WatermarkKey",
    "as_key",
    "collect_evidence",
    "dequantized_float",
    "embed_watermark",
    "int_layers",
    "keygen",
    "score",
    "tail_bound",
    "verify_watermark",
]
