"""Export a secquant artifact to ONNX, keeping its integer weights as integers.

The float parts of the model (LayerNorm, attention, pooling, convolution glue) are traced by
``torch.onnx.export(..., dynamo=False)``; every quantized layer is traced as one placeholder
node (a ``torch.autograd.Function`` with a ``symbolic``) which is then rewritten with
``onnx.helper`` into the operators below, built from the artifact's own packed codes, scales
and zero points. Nothing is re-quantized: the ONNX file holds the codes of ``model.safetensors``.

Which operators each scheme becomes, and why:

- int8 weights (per channel / per tensor) x static int8 activations (w8a8): QuantizeLinear on
  the input with the calibrated scale and zero point (uint8; signed codes shifted by 128) straight
  into com.microsoft::MatMulIntegerToFloat with the int8 weight initializer [K, N], its per-channel
  scales and the bias, which the GEMM's output stage adds. (The QDQ form, DQ x DQ -> MatMul, fuses
  into the same kernel but leaves the bias Add as one more pass over the output: measured ~3%
  slower on MiniLM at batch 32 x 128.) The smoothing scale is a Div in front of the quantizer, as in PyTorch.
- int8 weights x dynamic symmetric per-token int8 activations: the zero point is one constant (0, or
  128 once signed codes are shifted into uint8), so ReduceMin/ReduceMax give the token scale, a
  blocked QuantizeLinear (one block per row) the uint8 codes, and com.microsoft::MatMulIntegerToFloat
  takes the scalar zero point 128: ORT's plain U8S8 GEMM, the kernel quantize_dynamic's graphs run.
  Then one Mul by the token scale and the bias Add.
- int8 weights x dynamic asymmetric per-token int8 activations (w8a8-dynamic): ORT's DynamicQuantizeLinear
  is per tensor, and a per-tensor range over a MiniLM batch costs far too much accuracy (ORT's own
  quantize_dynamic reaches a mean cosine of only 0.958 / 0.992 per channel to fp32). So per-token
  ranges come from ReduceMin/ReduceMax over the feature axis, the activation is quantized once by
  a blocked QuantizeLinear (one block per row), and com.microsoft::MatMulIntegerToFloat multiplies
  the integers. The per-token zero point is removed inside the same integer GEMM: R extra input
  columns holding the row's zero point meet R extra int8 weight rows that sum to -colsum(W)
  (exact integer arithmetic; R ~ 10-60 for K = 384..1536). Then one Mul by the per-token scale and
  the bias Add. This is PyTorch's per-token fake quantization, computed exactly in integers. (On
  MiniLM the extra columns cost no measurable time against the symmetric form above: both are
  within noise of each other, 1.04-1.2x ORT's quantize_dynamic, the difference being the per-token
  scale Mul and the bias Add, which a per-tensor GEMM does in its output stage.)
  Per-tensor asymmetric dynamic activations use DynamicQuantizeLinear + MatMulInteger, which ORT
  fuses into DynamicQuantizeMatMul; other per-tensor forms pass scale and zero point to
  MatMulIntegerToFloat directly.
- weight-only 2..8-bit integer weights on Linear layers (w4a16, w3a16, w2a16, w8a16):
  com.microsoft::MatMulNBits with the recipe's group size as block size and the stored zero
  points (3-bit codes are stored as 4-bit, 5..7-bit as 8-bit: the codes fit exactly; per-channel
  scales are one block scale repeated along the row). accuracy_level=0 keeps float activations
  (what the PyTorch model computes); 4 lets ORT quantize activations per block internally.
- A rotated layer (recipe `rotation`, the GPTQ presets) first maps its input to x R: Mul by the
  random signs, the rows viewed as [-1, block], MatMul by the block's Hadamard matrix and back to
  the input's shape (Shape + Reshape); layers reading the same tensor share it. It then runs the
  kernel above on its stored (rotated) integer weight.
- Embedding tables: com.microsoft::GatherBlockQuantized on the integer table (never dequantized
  at export time).
- Convolutions: DequantizeLinear on the integer kernel (per channel, or blocked on the
  [out, in * k] view for groups) + Conv, with QuantizeLinear/DequantizeLinear on a statically
  quantized input. ORT fuses QDQ convolutions into QLinearConv only when the output is quantized
  too, which secquant's models do not do, so ORT runs these convolutions in float.
- Activations ORT has no integer kernel for (not 8-bit, or next to weights without an int8 GEMM)
  are fake-quantized exactly in float (QuantizeLinear/DequantizeLinear or the same arithmetic
  as PyTorch) in front of the weight kernel; the layer records that as a note.
- Weights ORT cannot run (codebook formats nf4 / pow2 / kmeans) fall back to a dequantized float
  initializer. Such fallbacks are recorded in the model's metadata (:func:`export_info`) and
  reported with an :class:`ExportFallbackWarning`; ``strict=True`` raises SecquantError naming the
  layer instead. Group sizes MatMulNBits cannot take (not a power of two >= 16) and per-input-channel
  scales keep their integers through DequantizeLinear + MatMul (noted, not a fallback).

Before the file is moved into place it is run once by ONNX Runtime on the model's evaluation
data and compared with the PyTorch quantized model; a mismatch raises and nothing is written.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .._version import __version__
from ..errors import SecquantError

ONNX_NAME = "model.onnx"
DEFAULT_OPSET = 21  # blocked QuantizeLinear / DequantizeLinear and 4-bit tensors need opset 21
TORCH_MAX_OPSET = 20  # the TorchScript exporter's newest opset; the graph is converted up from there
METADATA_KEY = "secquant.export"
MS = "com.microsoft"
EPS = float(torch.finfo(torch.float32).eps)
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PLACEHOLDER, PLACEHOLDER_DOMAIN = "QuantLayer", "secquant"
_SAMPLE_TEXTS = ["secquant keeps integer weights as integers.",
                 "A second, somewhat longer sentence makes the batch need padding and an attention mask."]


class ExportFallbackWarning(UserWarning):
    """Some layers were exported with dequantized float weights (see the message)."""


@dataclass
class LayerExport:
    """How one quantized layer was exported.

    kernel: int8 (integer GEMM), nbits (low-bit weight kernel, float activations), dequantize
    (integer weights dequantized at run time, then a float op) or float. weights: int (the
    artifact's codes are in the file), float (dequantized float initializer: a fallback) or
    none (the recipe left the weights in float).
    """

    name: str
    type: str
    ops: str
    kernel: str
    weights: str = "int"
    fallback: str | None = None  # why the weights are a float initializer
    note: str | None = None  # other departures from an all-integer layer


@dataclass
class ExportInfo:
    """What export_onnx wrote; stored as JSON in the ONNX metadata under `secquant.export`."""

    secquant_version: str
    opset: int
    kind: str
    inputs: list[str]
    output: str
    layers: list[LayerExport] = field(default_factory=list)

    @property
    def fallbacks(self) -> list[LayerExport]:
        return [x for x in self.layers if x.fallback is not None]

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ExportInfo:
        d = json.loads(text)
        d["layers"] = [LayerExport(**x) for x in d.get("layers", [])]
        return cls(**d)


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise SecquantError("ONNX export and inference need the packages onnx and onnxruntime "
                            "(pip install onnx onnxruntime)") from None


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


def _kernel_bits(bits: int) -> int:
    """Storage width of ORT's N-bit kernels that holds b-bit codes exactly (3 -> 4, 5..7 -> 8)."""
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def _is_pow2_block(n: int | None) -> bool:
    return n is not None and n >= 16 and (n & (n - 1)) == 0


def _row_block(k: int) -> int:
    """Block size carrying one scale per row through a block-wise kernel: a power of 2 in [16, 128]."""
    return min(128, max(16, 1 << max(0, (k - 1).bit_length())))


def _qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)


# ----------------------------------------------------------------------------------------------
# Weight views of a quantized layer
# ----------------------------------------------------------------------------------------------

@dataclass
class _W:
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


def _weight_view(mod: nn.Module) -> _W:
    a = mod.weight_args
    g = a.granularity
    gran = {"tensor": "tensor", "group": "group"}.get(g) or ("row" if a.axis in (0, -2) else "col")
    return _W(mod.weight_codes().numpy().astype(np.uint8), mod.weight_scale.detach().float().numpy(),
              mod.weight_zero_point.detach().numpy().astype(np.int64), a.bits, gran,
              a.group_size if gran == "group" else None)


def _int8_kernel(mod) -> bool:
    """8-bit per-channel (or per-tensor) integer weights x 8-bit activations: an integer GEMM applies."""
    wa = mod.weight_args
    act = getattr(mod, "input_quant", None)
    return (wa is not None and wa.format == "int" and wa.bits == 8 and act is not None and act.args.bits == 8
            and (wa.granularity == "tensor" or (wa.granularity == "channel" and wa.axis in (0, -2))))


def _zero_point_rows(colsum: np.ndarray) -> int:
    """Number of int8 weight rows (entries within [-127, 127]) that can sum to -colsum, rounded up to 4."""
    r = math.ceil(int(np.abs(colsum).max()) / 127) if colsum.size else 0
    return -(-r // 4) * 4


# ----------------------------------------------------------------------------------------------
# Graph emitter
# ----------------------------------------------------------------------------------------------

class _Emitter:
    """Collects the nodes and initializers that replace placeholder nodes, with unique names."""

    def __init__(self, graph) -> None:
        self.used: set[str] = set()
        for n in graph.node:
            self.used.update(n.input)
            self.used.update(n.output)
            self.used.add(n.name)
        self.used.update(i.name for i in graph.initializer)
        self.used.update(i.name for i in graph.input)
        self.used.update(o.name for o in graph.output)
        self.nodes: list = []
        self.inits: list = []
        self._consts: dict[tuple, str] = {}
        self.cache: dict[tuple, Any] = {}  # subgraphs shared by layers reading the same tensor

    def uniq(self, base: str) -> str:
        base = base.replace("/", ".")
        name, i = base, 1
        while name in self.used:
            i += 1
            name = f"{base}_{i}"
        self.used.add(name)
        return name

    def const(self, base: str, arr) -> str:
        from onnx import numpy_helper

        name = self.uniq(base)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(np.asarray(arr)), name))
        return name

    def scalar(self, value, dtype=np.float32) -> str:
        """A shared small constant (0-d; 1-d when given a list)."""
        arr = np.asarray(value, dtype=dtype)
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = self.const("secquant.const", arr)
        return self._consts[key]

    def const4(self, base: str, codes, signed: bool = False) -> str:
        """A UINT4 / INT4 initializer (ONNX packs two codes per byte, the first in the low nibble)."""
        from onnx import TensorProto, helper

        flat = np.asarray(codes).reshape(-1).astype(np.int64) & 0xF
        name = self.uniq(base)
        raw = pack_bits(flat.astype(np.uint8)[None, :], 4).reshape(-1).tobytes()
        self.inits.append(helper.make_tensor(name, TensorProto.INT4 if signed else TensorProto.UINT4,
                                             list(np.shape(codes)), raw, raw=True))
        return name

    def op(self, op_type: str, inputs: list[str], base: str, outputs: list[str] | int | None = None,
           domain: str = "", **attrs):
        from onnx import helper

        if outputs is None or isinstance(outputs, int):
            n = 1 if outputs is None else outputs
            outs = [self.uniq(f"{base}.{op_type}" + (f".{i}" if n > 1 else "")) for i in range(n)]
        else:
            outs = list(outputs)
        node = helper.make_node(op_type, list(inputs), outs, name=self.uniq(f"{base}/{op_type}"),
                                domain=domain or None, **attrs)
        self.nodes.append(node)
        return outs[0] if len(outs) == 1 else outs

    def bias_add(self, out: str, bias: np.ndarray | None, base: str, y: str) -> None:
        if bias is None:
            self.op("Identity", [out], base, outputs=[y])
            return
        self.op("Add", [out, self.const(f"{base}.bias", bias)], base, outputs=[y])


# ----------------------------------------------------------------------------------------------
# Activation quantization subgraphs
# ----------------------------------------------------------------------------------------------

def _act_key(a) -> tuple:
    return (a.granularity, a.bits, a.is_signed, a.symmetric)


def _static_qparams(act) -> tuple[float, int]:
    return float(act.scale.detach().float().item()), int(act.zero_point.detach().item())


def _dynamic_qparams(em: _Emitter, x: str, a, base: str) -> tuple[str, str]:
    """Scale and float zero point computed from x at run time exactly as choose_qparams does:
    shapes [..., 1] per token (ReduceMin/ReduceMax over the last axis), scalars per tensor."""
    key = ("qparams", x, _act_key(a))
    if key in em.cache:
        return em.cache[key]
    qmin, qmax = _qrange(a.bits, a.is_signed)
    zero = em.scalar(0.0)
    if a.granularity == "token":
        axes = em.scalar([-1], np.int64)
        lo = em.op("ReduceMin", [x, axes], base, keepdims=1)
        hi = em.op("ReduceMax", [x, axes], base, keepdims=1)
    else:
        lo = em.op("ReduceMin", [x], base, keepdims=0)
        hi = em.op("ReduceMax", [x], base, keepdims=0)
    lo = em.op("Min", [lo, zero], base)
    hi = em.op("Max", [hi, zero], base)
    if a.symmetric:
        amax = em.op("Max", [em.op("Neg", [lo], base), hi], base)
        s = em.op("Max", [em.op("Div", [amax, em.scalar(float((qmax - qmin) // 2))], base), em.scalar(EPS)], base)
        mid = 0 if a.is_signed else (qmax + 1) // 2
        z = em.op("Add", [em.op("Mul", [s, zero], base), em.scalar(float(mid))], base)  # mid, shaped like s
    else:
        s = em.op("Div", [em.op("Sub", [hi, lo], base), em.scalar(float(qmax - qmin))], base)
        s = em.op("Max", [s, em.scalar(EPS)], base)
        r = em.op("Round", [em.op("Div", [lo, s], base)], base)
        z = em.op("Clip", [em.op("Sub", [em.scalar(float(qmin)), r], base), em.scalar(float(qmin)),
                           em.scalar(float(qmax))], base)
    em.cache[key] = (s, z)
    return s, z


def _emulate(em: _Emitter, x: str, s: str, z: str, qmin: int, qmax: int, base: str) -> str:
    """(clamp(round(x / s) + z, qmin, qmax) - z) * s in float, the very arithmetic of PyTorch's fake_quantize."""
    q = em.op("Add", [em.op("Round", [em.op("Div", [x, s], base)], base), z], base)
    q = em.op("Clip", [q, em.scalar(float(qmin)), em.scalar(float(qmax))], base)
    return em.op("Mul", [em.op("Sub", [q, z], base), s], base)


def _fake_quant(em: _Emitter, x: str, act, base: str) -> tuple[str, str]:
    """Float tensor equal to PyTorch's fake-quantized activation; returns (name, description)."""
    a = act.args
    qmin, qmax = _qrange(a.bits, a.is_signed)
    if not a.dynamic:
        s, z = _static_qparams(act)
        if a.bits in (4, 8):
            sn = em.scalar(s)
            zn = (em.scalar(z, np.int8 if a.is_signed else np.uint8) if a.bits == 8
                  else em.const4(f"{base}.input_zero_point", np.asarray(z).reshape(()), signed=a.is_signed))
            q = em.op("QuantizeLinear", [x, sn, zn], base)
            return em.op("DequantizeLinear", [q, sn, zn], base), f"QuantizeLinear/DequantizeLinear({a.bits}-bit)"
        return (_emulate(em, x, em.scalar(s), em.scalar(float(z)), qmin, qmax, base),
                f"float fake-quant({a.bits}-bit static)")
    key = ("fq", x, _act_key(a))
    if key not in em.cache:
        s, z = _dynamic_qparams(em, x, a, base)
        em.cache[key] = _emulate(em, x, s, z, qmin, qmax, base)
    return em.cache[key], f"ReduceMin/ReduceMax + float fake-quant({a.bits}-bit dynamic per {a.granularity})"


# ----------------------------------------------------------------------------------------------
# Layer rewrites
# ----------------------------------------------------------------------------------------------

class _Ctx:
    def __init__(self, em: _Emitter, strict: bool, accuracy_level: int, ranks: dict[str, int | None]) -> None:
        self.em, self.strict, self.accuracy_level, self.ranks = em, strict, accuracy_level, ranks
        self.zrows: dict[tuple, int] = {}

    def fallback(self, name: str, reason: str) -> str:
        if self.strict:
            raise SecquantError(f"layer {name!r} cannot be exported with integer weights: {reason} "
                                "(strict=False exports it with dequantized float weights and records that)")
        return reason


def _float_weight_t(mod) -> np.ndarray:
    """The layer's float weight as [K, N] (dequantized for codebook formats)."""
    return np.ascontiguousarray(mod.dequantized_weight().detach().float().numpy().reshape(mod.rows, mod.cols).T)


def _matmul_nbits(ctx: _Ctx, x: str, w: _W, bias: np.ndarray | None, y: str, base: str) -> str:
    em = ctx.em
    nb = _kernel_bits(w.bits)
    bs = w.group if w.gran == "group" else _row_block(w.cols)
    K, N = w.cols, w.rows
    kb = -(-K // bs)
    s, z = w.block_params(bs)
    padded = np.repeat(z.astype(np.uint8), bs, axis=1)  # codes past K are zero points: they dequantize to 0
    padded[:, :K] = w.codes
    ins = [x, em.const(f"{base}.qweight", pack_bits(padded.reshape(N, kb, bs), nb)),  # [N, kb, bs*nb/8]
           em.const(f"{base}.scales", s.reshape(-1).astype(np.float32)),  # [N * kb]
           em.const(f"{base}.zero_points", pack_bits(z.astype(np.uint8), nb))]  # [N, ceil(kb*nb/8)]
    if bias is not None:
        ins += ["", em.const(f"{base}.bias", bias)]
    em.op("MatMulNBits", ins, base, outputs=[y], domain=MS, K=K, N=N, bits=nb, block_size=bs,
          accuracy_level=ctx.accuracy_level)
    return f"MatMulNBits(bits={nb}, block_size={bs}" + (f", {w.bits}-bit codes)" if nb != w.bits else ")")


def _dq_codes(em: _Emitter, w: _W, codes: np.ndarray, zp: np.ndarray, base: str) -> tuple[str, str, str]:
    """Integer initializers for codes and zero points: uint4 up to 4 bits, int8 for symmetric 8-bit, else uint8."""
    if w.bits <= 4:
        return em.const4(f"{base}.qweight", codes), em.const4(f"{base}.weight_zero_point", zp.astype(np.uint8)), "uint4"
    if w.signed_int8:
        return (em.const(f"{base}.qweight", (codes.astype(np.int16) - 128).astype(np.int8)),
                em.const(f"{base}.weight_zero_point", np.zeros(np.shape(zp), np.int8)), "int8")
    return em.const(f"{base}.qweight", codes), em.const(f"{base}.weight_zero_point", zp.astype(np.uint8)), "uint8"


_GRAN_NAME = {"tensor": "per tensor", "row": "per channel", "col": "per input channel"}


def _dq_weight_t(em: _Emitter, w: _W, base: str) -> tuple[str, str]:
    """DequantizeLinear of the transposed codes [K, N] (integers kept): (float output, description)."""
    if w.gran == "tensor":
        sc, zp, attrs = np.asarray(w.scale, np.float32).reshape(()), np.asarray(w.zp).reshape(()), {}
    elif w.gran == "row":
        sc, zp, attrs = w.scale.astype(np.float32), w.zp, {"axis": 1}
    elif w.gran == "col":
        sc, zp, attrs = w.scale.astype(np.float32), w.zp, {"axis": 0}
    else:
        sc, zp, attrs = w.scale.T.astype(np.float32), w.zp.T, {"axis": 0, "block_size": int(w.group)}
    q, zn, dt = _dq_codes(em, w, np.ascontiguousarray(w.codes.T), np.ascontiguousarray(zp), base)
    out = em.op("DequantizeLinear", [q, em.const(f"{base}.weight_scale", np.ascontiguousarray(sc)), zn], base, **attrs)
    return out, f"DequantizeLinear({dt}, {_GRAN_NAME.get(w.gran, f'blocked {w.group}')})"


def _rewrite_linear(ctx: _Ctx, name: str, mod, x: str, y: str) -> LayerExport:
    em, base = ctx.em, name
    wa, act = mod.weight_args, mod.input_quant
    bias = mod.bias.detach().float().numpy().copy() if mod.bias is not None else None
    parts: list[str] = []
    if mod.smooth_scale is not None:
        ss = mod.smooth_scale.detach().float().numpy()
        key = ("smooth", x, ss.tobytes())
        if key not in em.cache:
            em.cache[key] = em.op("Div", [x, em.const(f"{base}.smooth_scale", ss)], base)
        x = em.cache[key]
        parts.append("Div(smooth_scale)")
    if mod.rotation_block is not None:
        x, d = _rotation(em, x, mod.rotation_signs.detach().float().numpy(), mod.rotation_block, base)
        parts.append(d)
    if _int8_kernel(mod):
        parts.append(_int8_linear(ctx, x, act, _weight_view(mod), bias, y, base, mod.in_features))
        return LayerExport(name, "Linear", " -> ".join(parts), "int8")
    note = fallback = None
    if act is not None:
        x, d = _fake_quant(em, x, act, base)
        parts.append(d)
        note = (f"{act.args.bits}-bit activations with "
                f"{'float' if wa is None else f'{wa.bits}-bit {wa.format} {wa.granularity}'} weights have no ONNX "
                "Runtime integer GEMM: the activations are fake-quantized in float in front of the weight kernel")
    if wa is None:
        out = em.op("MatMul", [x, em.const(f"{base}.weight", _float_weight_t(mod))], base)
        parts.append("MatMul(float weight, left unquantized by the recipe)")
        kernel, weights = "float", "none"
    elif wa.format != "int":
        fallback = ctx.fallback(name, f"{wa.format} codebook weights have no ONNX Runtime kernel")
        out = em.op("MatMul", [x, em.const(f"{base}.weight_dequantized", _float_weight_t(mod))], base)
        parts.append("MatMul(dequantized float weight)")
        kernel, weights = "float", "float"
    else:
        w = _weight_view(mod)
        if w.gran in ("tensor", "row") or (w.gran == "group" and _is_pow2_block(w.group)):
            parts.append(_matmul_nbits(ctx, x, w, bias, y, base))
            return LayerExport(name, "Linear", " -> ".join(parts), "nbits", "int", None, note)
        wd, d = _dq_weight_t(em, w, base)
        parts.append(d + " -> MatMul")
        out = em.op("MatMul", [x, wd], base)
        kernel, weights = "dequantize", "int"
        why = (f"group size {w.group} (MatMulNBits needs a power of 2 >= 16)" if w.gran == "group"
               else "per-input-channel scales")
        note = "; ".join(filter(None, [note, f"{why}: integer weights dequantized at run time, float MatMul"]))
    em.bias_add(out, bias, base, y)
    return LayerExport(name, "Linear", " -> ".join(parts), kernel, weights, fallback, note)


def _rotation(em: _Emitter, x: str, signs: np.ndarray, block: int, base: str) -> tuple[str, str]:
    """x R = ((x * signs) as [-1, block] rows) @ Hadamard, back in x's shape; shared by the layers
    (q, k, v) that rotate the same tensor alike."""
    from ..quant.primitives.rotation import hadamard

    key = ("rotate", x, signs.tobytes(), block)
    if key not in em.cache:
        flipped = em.op("Mul", [x, em.const(f"{base}.rotation_signs", signs)], base)
        rows = em.op("Reshape", [flipped, em.scalar([-1, block], np.int64)], base)
        if ("hadamard", block) not in em.cache:  # one initializer per block size
            em.cache[("hadamard", block)] = em.const(f"secquant.hadamard{block}", hadamard(block).numpy())
        mixed = em.op("MatMul", [rows, em.cache[("hadamard", block)]], base)
        em.cache[key] = em.op("Reshape", [mixed, em.op("Shape", [x], base)], base)
    return em.cache[key], f"Mul(rotation_signs) -> MatMul(Hadamard {block}, per block)"


def _int8_linear(ctx: _Ctx, x: str, act, w: _W, bias, y: str, base: str, K: int) -> str:
    """8-bit weights (per channel / per tensor) x 8-bit activations on integer GEMMs."""
    from onnx import TensorProto

    em = ctx.em
    a = act.args
    ws, wz = w.row_params()
    wt_codes = np.ascontiguousarray(w.codes.T)  # [K, N]
    if w.signed_int8:
        wt_int = (wt_codes.astype(np.int16) - 128).astype(np.int8)
        wzn = None
        centered = wt_int.astype(np.int64)
    else:
        wt_int = wt_codes
        wzn = em.const(f"{base}.weight_zero_point", wz.astype(np.uint8))
        centered = wt_codes.astype(np.int64) - wz[None, :]
    wsn = em.const(f"{base}.weight_scale", ws)
    wdesc = f"{'int8' if w.signed_int8 else 'uint8'} weight [K, N]"
    if not a.dynamic:
        # Static: QuantizeLinear with the calibrated scale and zero point straight into
        # MatMulIntegerToFloat with the bias as its input, which the GEMM's output stage adds (a QDQ
        # DQ x DQ -> MatMul pair fuses into the same kernel but leaves the bias Add as a separate pass
        # over the output). Signed codes are shifted into uint8 (zero point + 128: q - z is unchanged),
        # ORT's U8S8 kernel.
        s, z = _static_qparams(act)
        zu = z + (128 if a.is_signed else 0)
        sn, zn = em.scalar(s), em.scalar(zu, np.uint8)
        key = ("sq", x, s, zu)
        if key not in em.cache:
            em.cache[key] = em.op("QuantizeLinear", [x, sn, zn], base)
        bias_in = [em.const(f"{base}.bias", bias)] if bias is not None else []
        em.op("MatMulIntegerToFloat", [em.cache[key], em.const(f"{base}.qweight", wt_int), sn, wsn, zn, wzn or ""]
              + bias_in, base, outputs=[y], domain=MS)
        return (f"QuantizeLinear(static, uint8{', signed codes + 128' if a.is_signed else ''}) -> "
                f"MatMulIntegerToFloat({wdesc}, bias in the GEMM)")
    if a.granularity == "tensor" and not a.symmetric and not a.is_signed:
        # choose_qparams' asymmetric uint8 range is DynamicQuantizeLinear's: ORT fuses the
        # pattern into DynamicQuantizeMatMul.
        key = ("dql", x)
        if key not in em.cache:
            em.cache[key] = em.op("DynamicQuantizeLinear", [x], base, outputs=3)
        q, s, z = em.cache[key]
        acc = em.op("MatMulInteger", [q, em.const(f"{base}.qweight", wt_int), z] + ([wzn] if wzn else []), base)
        f = em.op("Cast", [acc], base, to=TensorProto.FLOAT)
        em.bias_add(em.op("Mul", [f, em.op("Mul", [s, wsn], base)], base), bias, base, y)
        return "DynamicQuantizeLinear -> MatMulInteger -> Mul [ORT fuses: DynamicQuantizeMatMul]"
    s, zf = _dynamic_qparams(em, x, a, base)
    if a.granularity == "token" and a.symmetric:
        # Symmetric per token: the zero point is the same constant for every token (0 signed, 128
        # unsigned; signed codes are shifted into uint8 as code + 128), so it is a scalar zero point
        # of MatMulIntegerToFloat -- ORT's plain U8S8 GEMM, no zero-point rows. The codes come from one
        # blocked QuantizeLinear (one block per row), which divides by the scale as PyTorch does.
        key = ("symq", x, _act_key(a))
        if key not in em.cache:
            zu8 = em.op("Cast", [em.op("Add", [zf, em.scalar(128.0)], base) if a.is_signed else zf], base,
                        to=TensorProto.UINT8)  # 128 everywhere, shaped like the token scale
            em.cache[key] = em.op("QuantizeLinear", [x, s, zu8], base, axis=-1, block_size=int(K))
        f = em.op("MatMulIntegerToFloat", [em.cache[key], em.const(f"{base}.qweight", wt_int), em.scalar(1.0), wsn,
                                           em.scalar(128, np.uint8)] + ([wzn] if wzn else []), base, domain=MS)
        em.bias_add(em.op("Mul", [f, s], base), bias, base, y)
        return (f"ReduceMin/ReduceMax per token -> QuantizeLinear(blocked, uint8, zero point 128) -> "
                f"MatMulIntegerToFloat({wdesc}) -> Mul(token scale)")
    shift = 128 if a.is_signed else 0  # signed codes shifted into uint8: q - z is unchanged
    key = ("dynq", x, _act_key(a))
    if key not in em.cache:
        zu8 = em.op("Cast", [em.op("Add", [zf, em.scalar(float(shift))], base) if shift else zf], base,
                    to=TensorProto.UINT8)
        if a.granularity == "token":
            q = em.op("QuantizeLinear", [x, s, zu8], base, axis=-1, block_size=int(K))
        else:
            q = em.op("QuantizeLinear", [x, s, zu8], base)
        em.cache[key] = (q, zu8)
    q, zu8 = em.cache[key]
    if a.granularity != "token":  # scalar scale and zero point: MatMulIntegerToFloat takes them (and the bias)
        bias_in = [em.const(f"{base}.bias", bias)] if bias is not None else []
        em.op("MatMulIntegerToFloat", [q, em.const(f"{base}.qweight", wt_int), s, wsn, zu8, wzn or ""] + bias_in,
              base, outputs=[y], domain=MS)
        return f"ReduceMin/ReduceMax -> QuantizeLinear -> MatMulIntegerToFloat({wdesc})"
    # Per token: sum_k (q - z) w = sum_k q w - z colsum(w). The z term goes into the integer GEMM:
    # R extra input columns hold each row's z, R extra int8 weight rows sum to -colsum(w).
    colsum = centered.sum(0)
    R = max(_zero_point_rows(colsum), ctx.zrows.get(("zrows", x, _act_key(a)), 0))
    if w.signed_int8 and R <= max(16, K // 4):
        extra = np.zeros((R, colsum.size), np.int64)
        rem = -colsum.astype(np.int64)
        for j in range(R):
            extra[j] = np.clip(np.round(rem / (R - j)), -127, 127)
            rem = rem - extra[j]
        assert not rem.any(), "zero-point rows do not cancel the column sums"
        wt_aug = em.const(f"{base}.qweight", np.concatenate([wt_int.astype(np.int64), extra]).astype(np.int8))
        ckey = ("zcols", q, R)
        if ckey not in em.cache:  # q with R copies of its row's zero point appended, shared by q/k/v
            lead = em.op("Shape", [zu8], base, end=-1)
            shape = em.op("Concat", [lead, em.scalar([R], np.int64)], base, axis=0)
            em.cache[ckey] = em.op("Concat", [q, em.op("Expand", [zu8, shape], base)], base, axis=-1)
        f = em.op("MatMulIntegerToFloat", [em.cache[ckey], wt_aug, em.scalar(1.0), wsn], base, domain=MS)
        em.bias_add(em.op("Mul", [f, s], base), bias, base, y)
        return (f"ReduceMin/ReduceMax per token -> QuantizeLinear(blocked, one block per row) -> "
                f"MatMulIntegerToFloat({wdesc} + {R} zero-point rows) -> Mul(token scale)")
    # weights whose column sums need too many rows (or asymmetric weights): subtract z * colsum in float
    f = em.op("MatMulIntegerToFloat", [q, em.const(f"{base}.qweight", wt_int), em.scalar(1.0), wsn]
              + (["", wzn] if wzn else []), base, domain=MS)
    zu = em.op("Cast", [zu8], base, to=TensorProto.FLOAT)
    corr = em.op("Mul", [zu, em.const(f"{base}.weight_colsum", (ws.astype(np.float64) * colsum).astype(np.float32))],
                 base)
    em.bias_add(em.op("Mul", [em.op("Sub", [f, corr], base), s], base), bias, base, y)
    return (f"ReduceMin/ReduceMax per token -> QuantizeLinear(blocked, one block per row) -> "
            f"MatMulIntegerToFloat({wdesc}) -> zero-point correction -> Mul(token scale)")


def _plan_zero_point_rows(graph, layers: dict[str, nn.Module]) -> dict[tuple, int]:
    """Per-token int8 layers reading the same tensor share one quantized input: one row count for all."""
    from ..quant.modules import QuantLinear

    out: dict[tuple, int] = {}
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            continue
        mod = layers[_layer_name(node)]
        if not (isinstance(mod, QuantLinear) and _int8_kernel(mod) and mod.smooth_scale is None
                and mod.rotation_block is None):
            continue
        a = mod.input_quant.args
        w = _weight_view(mod)
        if a.dynamic and a.granularity == "token" and not a.symmetric and w.signed_int8:
            key = ("zrows", node.input[0], _act_key(a))
            out[key] = max(out.get(key, 0), _zero_point_rows(w.codes.astype(np.int64).sum(1) - 128 * w.cols))
    return out


def _conv_pads(mod, k: tuple[int, ...]) -> list[int]:
    p = mod.padding
    if isinstance(p, str):
        if p == "valid":
            return [0] * (2 * len(k))
        total = [d * (kk - 1) for kk, d in zip(k, mod.dilation)]  # 'same' (stride 1): extra padding at the end
        return [t // 2 for t in total] + [t - t // 2 for t in total]
    p = list(p) if isinstance(p, (tuple, list)) else [p] * len(k)
    return p + p


def _rewrite_conv(ctx: _Ctx, name: str, mod, x: str, y: str) -> LayerExport:
    em, base = ctx.em, name
    wa, act = mod.weight_args, mod.input_quant
    parts: list[str] = []
    note = fallback = None
    if act is not None:
        x, d = _fake_quant(em, x, act, base)
        parts.append(d)
    shape = tuple(mod.weight_shape)
    if wa is None:
        wd, kernel, weights = em.const(f"{base}.weight", mod.weight.detach().float().numpy()), "float", "none"
        parts.append("float weight")
    elif wa.format != "int":
        fallback = ctx.fallback(name, f"{wa.format} codebook weights have no ONNX Runtime kernel")
        wd = em.const(f"{base}.weight_dequantized", mod.dequantized_weight().detach().float().numpy())
        kernel, weights = "float", "float"
        parts.append("dequantized float weight")
    else:
        w = _weight_view(mod)
        kernel, weights = "dequantize", "int"
        if w.gran in ("tensor", "row"):  # DequantizeLinear on the kernel in its own shape
            if w.gran == "tensor":
                sc, zp, attrs = np.asarray(w.scale, np.float32).reshape(()), np.asarray(w.zp).reshape(()), {}
            else:
                sc, zp, attrs = w.scale.astype(np.float32), w.zp, {"axis": 0}
            q, zn, dt = _dq_codes(em, w, w.codes.reshape(shape), zp, base)
            wd = em.op("DequantizeLinear", [q, em.const(f"{base}.weight_scale", sc), zn], base, **attrs)
        else:  # per input column or groups along [in * k]: dequantize the 2-D view, then reshape
            q, zn, dt = _dq_codes(em, w, w.codes, w.zp, base)
            attrs = {"axis": 1} if w.gran == "col" else {"axis": 1, "block_size": int(w.group)}
            w2 = em.op("DequantizeLinear", [q, em.const(f"{base}.weight_scale", w.scale.astype(np.float32)), zn],
                       base, **attrs)
            wd = em.op("Reshape", [w2, em.scalar(list(shape), np.int64)], base)
        parts.append(f"DequantizeLinear({dt}, {_GRAN_NAME.get(w.gran, f'blocked {w.group}')})")
        note = "ORT runs QDQ convolutions in float unless their output is quantized too"
    k = shape[2:]
    ins = [x, wd] + ([em.const(f"{base}.bias", mod.bias.detach().float().numpy())] if mod.bias is not None else [])
    em.op("Conv", ins, base, outputs=[y], kernel_shape=list(k), strides=list(mod.stride),
          dilations=list(mod.dilation), pads=_conv_pads(mod, k), group=int(mod.groups))
    parts.append("Conv")
    return LayerExport(name, mod.layer_type, " -> ".join(parts), kernel, weights, fallback, note)


def _rewrite_embedding(ctx: _Ctx, name: str, mod, idx: str, y: str) -> LayerExport:
    from onnx import TensorProto

    em, base = ctx.em, name
    wa = mod.weight_args
    V, D = mod.num_embeddings, mod.embedding_dim
    if wa is None or wa.format != "int":
        fallback = None
        if wa is None:
            table, weights = mod.weight.detach().float().numpy(), "none"
        else:
            fallback = ctx.fallback(name, f"{wa.format} codebook table has no ONNX Runtime kernel")
            table, weights = mod.dequantized_weight().detach().float().numpy(), "float"
        em.op("Gather", [em.const(f"{base}.weight", table), idx], base, outputs=[y], axis=0)
        return LayerExport(name, "Embedding", "Gather(float table)", "float", weights, fallback)
    w = _weight_view(mod)
    nb = _kernel_bits(w.bits)
    if w.gran in ("tensor", "row") or (w.gran == "group" and _is_pow2_block(w.group)):
        bs = w.group if w.gran == "group" else _row_block(D)
        s, z = w.block_params(bs)
        if nb == 4:  # uint4 tensors: ORT's shape inference reads their logical shape [V, D]
            data, zps = em.const4(f"{base}.qweight", w.codes), em.const4(f"{base}.zero_points", z.astype(np.uint8))
        else:
            data = em.const(f"{base}.qweight", pack_bits(w.codes, nb))
            zps = em.const(f"{base}.zero_points", pack_bits(z.astype(np.uint8), nb))
        em.op("GatherBlockQuantized", [data, idx, em.const(f"{base}.scales", s.astype(np.float32)), zps], base,
              outputs=[y], domain=MS, bits=nb, block_size=bs, gather_axis=0, quantize_axis=1)
        return LayerExport(name, "Embedding", f"GatherBlockQuantized(bits={nb}, block_size={bs})", "nbits")
    # Exact generic path: gather integer rows, then (code - zero point) * scale in float.
    codes = w.codes
    if w.gran == "group":
        G, g = w.scale.shape[1], int(w.group)
        codes = np.zeros((V, G * g), np.uint8)
        codes[:, :D] = w.codes
    rows = em.op("Cast", [em.op("Gather", [em.const(f"{base}.qweight", codes), idx], base, axis=0)], base,
                 to=TensorProto.FLOAT)
    if w.gran == "col":
        zn = em.const(f"{base}.weight_zero_point", w.zp.astype(np.float32))
        em.op("Mul", [em.op("Sub", [rows, zn], base), em.const(f"{base}.weight_scale", w.scale.astype(np.float32))],
              base, outputs=[y])
    else:
        G, g = w.scale.shape[1], int(w.group)
        shp = em.op("Shape", [idx], base)
        grouped = em.op("Reshape", [rows, em.op("Concat", [shp, em.scalar([G, g], np.int64)], base, axis=0)], base)
        zr = em.op("Gather", [em.const(f"{base}.weight_zero_point", w.zp.astype(np.float32)[:, :, None]), idx], base,
                   axis=0)
        sr = em.op("Gather", [em.const(f"{base}.weight_scale", w.scale.astype(np.float32)[:, :, None]), idx], base,
                   axis=0)
        deq = em.op("Mul", [em.op("Sub", [grouped, zr], base), sr], base)
        flat = em.op("Reshape", [deq, em.op("Concat", [shp, em.scalar([G * g], np.int64)], base, axis=0)], base)
        em.op("Slice", [flat, em.scalar([0], np.int64), em.scalar([D], np.int64), em.scalar([-1], np.int64)], base,
              outputs=[y])
    return LayerExport(name, "Embedding", "Gather(integer rows) -> (code - zero point) * scale", "dequantize",
                       note=f"{w.gran} granularity" + (f" with group size {w.group}" if w.group else "")
                       + " has no GatherBlockQuantized form")


# ----------------------------------------------------------------------------------------------
# Tracing with placeholders
# ----------------------------------------------------------------------------------------------

_ACTIVE: dict[str, nn.Module] = {}  # placeholder name -> quantized layer, while one trace runs
_OUT_RANK: dict[str, int] = {}
_TRACE_LOCK = threading.Lock()


class _Placeholder(torch.autograd.Function):
    """Runs the quantized layer eagerly (untraced); exports as one secquant::QuantLayer node."""

    @staticmethod
    def forward(ctx, x, name):
        state = torch._C._get_tracing_state()
        torch._C._set_tracing_state(None)
        try:
            with torch.no_grad():
                out = _ACTIVE[name](x)
        finally:
            torch._C._set_tracing_state(state)
        _OUT_RANK[name] = out.dim()
        return out

    @staticmethod
    def symbolic(g, x, name):
        out = g.op(f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER}", x, layer_s=name)
        try:
            t = x.type().with_dtype(torch.float32)
            out.setType(t.with_sizes([None] * _OUT_RANK[name]) if name in _OUT_RANK else t)
        except Exception:  # pragma: no cover - type hints only help the exporter's shape inference
            pass
        return out


class _Stub(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.layer_name = name

    def forward(self, x):
        return _Placeholder.apply(x, self.layer_name)


def _quant_layers(root: nn.Module) -> dict[str, nn.Module]:
    from ..quant.modules import QuantizedWeightMixin

    return {n: m for n, m in root.named_modules() if n and isinstance(m, QuantizedWeightMixin)}


def _set_sub(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def _layer_name(node) -> str:
    return next(a.s.decode() for a in node.attribute if a.name == "layer")


def _trace(module: nn.Module, kind: str, sample, opset: int, path: Path,
           quantized: bool) -> tuple[list[str], str, dict[str, nn.Module], dict[str, int]]:
    """torch.onnx.export with every quantized layer swapped for a placeholder (all restored afterwards)."""
    layers = _quant_layers(module) if quantized else {}
    grads = {p: p.requires_grad for p in module.parameters()}
    transformer = getattr(module, "transformer", None)
    cfg = getattr(transformer, "config", None)
    attn_before = getattr(cfg, "_attn_implementation", None)
    was_training = module.training
    try:
        for n in layers:
            _set_sub(module, n, _Stub(n))
        _ACTIVE.clear()
        _ACTIVE.update(layers)
        _OUT_RANK.clear()
        for p in grads:
            p.requires_grad_(False)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "eager"  # MatMul/Softmax attention: traceable, and ORT fuses it
        if kind == "encoder":
            names = [n for n in ENCODER_INPUTS if n in sample]
            args, kwargs, output = (), {n: sample[n] for n in names}, "embeddings"
            axes = {n: {0: "batch", 1: "sequence"} for n in names}
        else:
            names, args, kwargs, output = ["input"], (sample,), None, "logits"
            axes = {"input": {0: "batch"}}
        axes[output] = {0: "batch"}
        module.eval()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(module, args, str(path), kwargs=kwargs, input_names=names, output_names=[output],
                              dynamic_axes=axes, opset_version=min(opset, TORCH_MAX_OPSET), dynamo=False,
                              do_constant_folding=True,
                              custom_opsets={PLACEHOLDER_DOMAIN: 1} if layers else None)
    finally:
        for n, m in layers.items():
            _set_sub(module, n, m)
        _ACTIVE.clear()
        for p, rg in grads.items():
            p.requires_grad_(rg)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = attn_before
        module.train(was_training)
    return names, output, layers, dict(_OUT_RANK)


def _simplify(model) -> None:
    """Exact rewrites of traced patterns that ORT's symbolic shape inference (used by its transformer
    fusions) cannot follow: ReduceL2 becomes Sqrt(ReduceSum(x * x)), and an Expand to Shape(y) that
    only feeds a broadcasting binary op with y is dropped (broadcasting does it)."""
    from onnx import helper

    g = model.graph
    producer = {o: n for n in g.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in g.output}
    new_nodes = []
    for n in g.node:
        if n.op_type == "Expand" and not n.domain and n.output[0] not in outputs:
            shape = producer.get(n.input[1])
            users = consumers.get(n.output[0], [])
            if shape is not None and shape.op_type == "Shape" and users and all(
                    u.op_type in ("Div", "Mul", "Add", "Sub") and len(u.input) == 2 and shape.input[0] in u.input
                    for u in users):
                for u in users:
                    for k, i in enumerate(u.input):
                        if i == n.output[0]:
                            u.input[k] = n.input[0]
                continue
        if n.op_type == "ReduceL2" and not n.domain:
            sq, ss = n.output[0] + "_sq", n.output[0] + "_sumsq"
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            new_nodes += [helper.make_node("Mul", [n.input[0], n.input[0]], [sq], name=n.name + "_sq"),
                          helper.make_node("ReduceSum", [sq] + list(n.input[1:]), [ss], name=n.name + "_sumsq",
                                           **attrs),
                          helper.make_node("Sqrt", [ss], list(n.output), name=n.name + "_sqrt")]
            continue
        new_nodes.append(n)
    del g.node[:]
    g.node.extend(new_nodes)


def _rewrite(model, layers: dict[str, nn.Module], ranks: dict[str, int], strict: bool,
             accuracy_level: int) -> list[LayerExport]:
    from onnx import helper

    from ..quant.modules import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear

    graph = model.graph
    em = _Emitter(graph)
    ctx = _Ctx(em, strict, accuracy_level, ranks)
    ctx.zrows = _plan_zero_point_rows(graph, layers)
    new_nodes, records = [], []
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            new_nodes.append(node)
            continue
        name = _layer_name(node)
        mod = layers[name]
        em.nodes = []
        x, y = node.input[0], node.output[0]
        if isinstance(mod, QuantLinear):
            rec = _rewrite_linear(ctx, name, mod, x, y)
        elif isinstance(mod, (QuantConv2d, QuantConv1d)):
            rec = _rewrite_conv(ctx, name, mod, x, y)
        elif isinstance(mod, QuantEmbedding):
            rec = _rewrite_embedding(ctx, name, mod, x, y)
        else:  # pragma: no cover - every quantized layer class is handled above
            raise SecquantError(f"layer {name!r}: no ONNX export for {type(mod).__name__}")
        new_nodes.extend(em.nodes)
        records.append(rec)
    del graph.node[:]
    graph.node.extend(new_nodes)
    graph.initializer.extend(em.inits)
    del graph.value_info[:]  # shapes recorded while tracing one sample; ORT infers its own
    ops = [o for o in model.opset_import if o.domain not in (PLACEHOLDER_DOMAIN, MS)]
    del model.opset_import[:]
    model.opset_import.extend(ops + [helper.make_opsetid(MS, 1)])
    return records


# ----------------------------------------------------------------------------------------------
# Building, checking and writing
# ----------------------------------------------------------------------------------------------

def build_onnx(module: nn.Module, kind: str, sample, *, opset: int = DEFAULT_OPSET, strict: bool = False,
               accuracy_level: int = 0, quantized: bool = True):
    """The ONNX ModelProto of a secquant model (quantized layers rewritten; float layers as traced)
    and its ExportInfo, in memory. `kind` is "encoder" (sample: tokenizer dict) or "classifier"
    (sample: input tensor); `quantized=False` exports every layer as a float layer."""
    _require_onnx()
    import onnx
    import onnx.version_converter

    if not DEFAULT_OPSET <= opset <= onnx.defs.onnx_opset_version():
        raise SecquantError(f"opset {opset} is not supported: quantized layers need opset >= {DEFAULT_OPSET} "
                            f"(blocked QuantizeLinear, 4-bit tensors); this onnx knows up to "
                            f"{onnx.defs.onnx_opset_version()}")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise SecquantError("accuracy_level must be 0..4 (MatMulNBits' accuracy_level)")
    with tempfile.TemporaryDirectory(prefix="secquant-onnx-") as td:
        raw = Path(td) / "traced.onnx"
        with _TRACE_LOCK:
            names, output, layers, ranks = _trace(module, kind, sample, opset, raw, quantized)
        model = onnx.load(str(raw))
    if max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) < opset:
        model = onnx.version_converter.convert_version(model, opset)
    _simplify(model)
    records = _rewrite(model, layers, ranks, strict, accuracy_level) if layers else []
    model.producer_name, model.producer_version = "secquant", __version__
    info = ExportInfo(__version__, opset, kind, names, output, records)
    _set_info(model, info)
    return model, info


def _set_info(model, info: ExportInfo) -> None:
    for p in [p for p in model.metadata_props if p.key == METADATA_KEY]:
        model.metadata_props.remove(p)
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, info.to_json()


def _save(model, path: Path, threshold: int) -> list[Path]:
    """Write the model inline, or with one external data file `<name>.data` when its tensors exceed threshold bytes."""
    import onnx

    size = sum(len(t.raw_data) or t.ByteSize() for t in model.graph.initializer)
    if size > threshold:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=0, convert_attribute=False)
        return [path, path.with_name(path.name + ".data")]
    onnx.save_model(model, str(path))
    return [path]


def _run_torch(module: nn.Module, kind: str, batch) -> torch.Tensor:
    with torch.no_grad():
        if kind == "encoder":
            return module(**{k: v for k, v in batch.items() if k in ENCODER_INPUTS}).float()
        return module(batch).float()


def _feeds(sess, kind: str, batch) -> dict[str, np.ndarray]:
    names = [i.name for i in sess.get_inputs()]
    if kind == "encoder":
        return {n: batch[n].detach().cpu().numpy().astype(np.int64) for n in names}
    return {names[0]: batch.detach().cpu().float().numpy()}


def agreement(got: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Per-sample agreement of two [batch, ...] outputs: max abs difference, relative max error
    (median and max over samples) and cosine similarity (min and mean)."""
    if tuple(got.shape) != tuple(ref.shape):
        raise SecquantError(f"the ONNX model returns shape {tuple(got.shape)} where PyTorch returns {tuple(ref.shape)}")
    g, r = got.reshape(len(got), -1).double(), ref.reshape(len(ref), -1).double()
    rel = (g - r).abs().amax(1) / r.abs().amax(1).clamp(min=1e-12)
    cos = torch.nn.functional.cosine_similarity(g, r, dim=1)
    return {"max_abs_diff": float((g - r).abs().max()), "median_rel_diff": float(rel.median()),
            "max_rel_diff": float(rel.max()), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean())}


def agrees(v: dict[str, float]) -> bool:
    """The acceptance rule for an ONNX model against the PyTorch quantized model.

    Quantized models are discontinuous: a last-bit float difference (another GEMM summation order)
    can move an activation across a rounding boundary, and with dynamic per-token ranges such flips
    cascade through the layers (PyTorch's own MiniLM w8a8-dynamic output moves to a mean cosine of
    0.9997, worst 0.9985, when its embeddings are scaled by 1 + 1e-7). So the rule is on cosine:
    loose enough for that, tight enough to catch a wrong scale, zero point or axis.
    """
    return v["mean_cosine"] >= 0.999 and v["min_cosine"] >= 0.98


def validate_onnx(path: str | os.PathLike, reference: torch.Tensor, kind: str, batch,
                  threads: int = 1) -> dict[str, float]:
    """Run an ONNX file in ONNX Runtime (all graph optimizations on) and compare with `reference`."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return agreement(torch.from_numpy(sess.run(None, _feeds(sess, kind, batch))[0]).float(), reference)


def _sample(handle, kind: str, sample_input):
    if sample_input is not None:
        return dict(sample_input) if kind == "encoder" else sample_input
    if kind == "encoder":
        return dict(handle.adapter.encode(_SAMPLE_TEXTS))
    shape = getattr(handle.adapter, "sample_shape", None)
    if not shape:
        raise SecquantError("this classifier does not record its input shape: pass sample_input=<a batch tensor>")
    return torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))


def _validation_batch(handle, kind: str, sample):
    """A realistic batch for the check after export: the model's built-in evaluation data if any."""
    try:
        batch = next(iter(handle.adapter.eval_batches(None, 32)))[0]
    except Exception:  # no built-in data: the tracing sample
        return sample
    return dict(batch) if kind == "encoder" else batch


def _loaded(artifact, model=None, factory=None):
    if isinstance(artifact, (str, os.PathLike)):
        from ..artifact.store import load_artifact

        return load_artifact(Path(artifact), model=model, factory=factory)
    if all(hasattr(artifact, a) for a in ("module", "manifest", "handle")):
        return artifact
    raise SecquantError(f"export_onnx takes an artifact directory or a loaded artifact, not {type(artifact).__name__}")


def _inside(p: Path, d: Path) -> bool:
    try:
        p.resolve().relative_to(d.resolve())
        return True
    except ValueError:
        return False


def _register(art_dir: Path, out: Path, staging: Path) -> None:
    """List the ONNX file (and its external data) with their sha256 in the artifact's manifest."""
    from ..artifact.hashing import file_sha256
    from ..artifact.manifest import MANIFEST_NAME, read_manifest

    manifest = read_manifest(art_dir)
    rel = out.resolve().relative_to(art_dir.resolve()).as_posix()
    files = {k: v for k, v in manifest.files.items() if k not in (rel, rel + ".data")}
    files[rel] = file_sha256(out)
    data = out.with_name(out.name + ".data")
    if data.is_file():
        files[rel + ".data"] = file_sha256(data)
    manifest = manifest.model_copy(update={"files": dict(sorted(files.items()))})
    tmp = staging / MANIFEST_NAME
    tmp.write_text(manifest.to_json(), encoding="utf-8")
    os.replace(tmp, art_dir / MANIFEST_NAME)


def _staging_dir(out: Path, art_dir: Path | None) -> Path:
    """A private temporary directory on the same file system as `out`, outside the artifact if possible
    (a crash must not leave unlisted files in it: the artifact would no longer verify)."""
    for parent in ([art_dir.parent] if art_dir is not None and _inside(out, art_dir) else []) + [out.parent]:
        try:
            return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=parent))
        except OSError:
            continue
    raise SecquantError(f"cannot create a temporary file next to {out}")


def export_onnx(artifact, out_path: str | os.PathLike | None = None, *, external_data_threshold: int = 2**31 - 1,
                opset: int = DEFAULT_OPSET, strict: bool = False, accuracy_level: int = 0, validate: bool = True,
                register: bool = True, sample_input=None, model: nn.Module | None = None,
                factory: str | None = None) -> Path:
    """Write the artifact as ONNX (default `<artifact>/model.onnx`) and return the path.

    `artifact` is an artifact directory, a ``LoadedArtifact`` or a ``secquant.load`` /
    ``secquant.quantize`` result. Integer weights stay integers; the operators each scheme maps
    to are listed in this module's docstring and recorded per layer in the file's metadata
    (:func:`export_info`). Layers whose weights ONNX Runtime cannot run (codebook formats) are
    exported with dequantized float weights, reported by an :class:`ExportFallbackWarning` and
    recorded; ``strict=True`` raises :class:`SecquantError` naming the layer instead.

    The file is written under a temporary name and renamed into place. Models whose tensors
    exceed ``external_data_threshold`` bytes use ONNX's external data format (``<name>.data``
    next to the model). ``opset`` >= 21. ``accuracy_level`` goes to MatMulNBits (0: float
    activations, exactly what PyTorch computes; 4: ORT quantizes activations per block
    internally). Unless ``validate=False``, the written model is run by ONNX Runtime on the
    model's evaluation data and compared with the PyTorch quantized model (see :func:`agrees`);
    a mismatch raises and nothing is written. A file written inside the artifact directory is
    added, with its sha256, to the manifest (``register``), so the artifact still verifies and
    Session can check the ONNX file before running it. `sample_input` (a batch) is needed only
    for classifiers that do not record their input shape; `model` / `factory` as for
    ``secquant.load``.
    """
    _require_onnx()
    la = _loaded(artifact, model, factory)
    art_dir = Path(la.path) if getattr(la, "path", None) else None
    if out_path is None:
        if art_dir is None:
            raise SecquantError("this model has no artifact directory: pass out_path=")
        out = art_dir / ONNX_NAME
    else:
        out = Path(out_path)
        out = out / ONNX_NAME if out.is_dir() else out
    if out.suffix != ".onnx":
        raise SecquantError(f"{out}: the ONNX file name must end in .onnx")
    kind = la.manifest.model.kind
    sample = _sample(la.handle, kind, sample_input)
    module = la.module
    proto, info = build_onnx(module, kind, sample, opset=opset, strict=strict, accuracy_level=accuracy_level)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = _staging_dir(out, art_dir)
    try:
        written = _save(proto, staging / out.name, external_data_threshold)
        del proto
        if validate:
            batch = _validation_batch(la.handle, kind, sample)
            v = validate_onnx(written[0], _run_torch(module, kind, batch), kind, batch)
            if not agrees(v):
                raise SecquantError(
                    f"the exported ONNX model does not reproduce the PyTorch quantized model (mean cosine "
                    f"{v['mean_cosine']:.6f}, worst {v['min_cosine']:.6f}, max abs difference "
                    f"{v['max_abs_diff']:.3g}); nothing was written")
        data = out.with_name(out.name + ".data")
        if len(written) == 2:
            os.replace(written[1], data)
        os.replace(written[0], out)
        if len(written) == 1 and data.exists():
            data.unlink()
        if register and art_dir is not None and _inside(out, art_dir):
            _register(art_dir, out, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    fb = info.fallbacks
    if fb:
        warnings.warn(f"{len(fb)} layer(s) exported with dequantized float weights: "
                      + "; ".join(f"{x.name} ({x.fallback})" for x in fb), ExportFallbackWarning, stacklevel=2)
    return out


def export_info(path: str | os.PathLike) -> ExportInfo | None:
    """The ExportInfo stored in an ONNX file written by export_onnx (an artifact directory means its
    model.onnx); None for ONNX files secquant did not write."""
    _require_onnx()
    import onnx

    p = Path(path)
    p = p / ONNX_NAME if p.is_dir() else p
    for prop in onnx.load(str(p), load_external_data=False).metadata_props:
        if prop.key == METADATA_KEY:
            return ExportInfo.from_json(prop.value)
    return None


def export_float_onnx(module: nn.Module, kind: str, sample, path: str | os.PathLike, *,
                      opset: int = DEFAULT_OPSET) -> Path:
    """A float model (e.g. the source of an artifact) as ONNX with the same tracing, for baselines."""
    proto, _ = build_onnx(module, kind, sample, opset=opset, quantized=False)
    p = Path(path)
    _save(proto, p, 2**31 - 1)
    return p


__all__ = ["export_onnx", "export_info", "export_float_onnx", "build_onnx", "validate_onnx", "agreement", "agrees",
           "ExportInfo", "LayerExport", "ExportFallbackWarning", "ONNX_NAME", "DEFAULT_OPSET", "pack_bits"]
