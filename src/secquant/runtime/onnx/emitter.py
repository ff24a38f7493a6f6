"""Writing ONNX nodes and initializers, and the activation-quantization subgraphs built from them."""

from __future__ import annotations

from typing import Any

import numpy as np

from .info import EPS
from .weights import int_range, pack_bits

# ----------------------------------------------------------------------------------------------
# Graph emitter
# ----------------------------------------------------------------------------------------------

class Emitter:
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

def act_key(a) -> tuple:
    return (a.granularity, a.bits, a.is_signed, a.symmetric)


def static_qparams(act) -> tuple[float, int]:
    return float(act.scale.detach().float().item()), int(act.zero_point.detach().item())


def dynamic_qparams(em: Emitter, x: str, a, base: str) -> tuple[str, str]:
    """Scale and float zero point computed from x at run time exactly as choose_qparams does:
    shapes [..., 1] per token (ReduceMin/ReduceMax over the last axis), scalars per tensor."""
    key = ("qparams", x, act_key(a))
    if key in em.cache:
        return em.cache[key]
    qmin, qmax = int_range(a.bits, a.is_signed)
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


def _emulate(em: Emitter, x: str, s: str, z: str, qmin: int, qmax: int, base: str) -> str:
    """(clamp(round(x / s) + z, qmin, qmax) - z) * s in float, the very arithmetic of PyTorch's fake_quantize."""
    q = em.op("Add", [em.op("Round", [em.op("Div", [x, s], base)], base), z], base)
    q = em.op("Clip", [q, em.scalar(float(qmin)), em.scalar(float(qmax))], base)
    return em.op("Mul", [em.op("Sub", [q, z], base), s], base)


def fake_quant(em: Emitter, x: str, act, base: str) -> tuple[str, str]:
    """Float tensor equal to PyTorch's fake-quantized activation; returns (name, description)."""
    a = act.args
    qmin, qmax = int_range(a.bits, a.is_signed)
    if not a.dynamic:
        s, z = static_qparams(act)
        if a.bits in (4, 8):
            sn = em.scalar(s)
            zn = (em.scalar(z, np.int8 if a.is_signed else np.uint8) if a.bits == 8
                  else em.const4(f"{base}.input_zero_point", np.asarray(z).reshape(()), signed=a.is_signed))
            q = em.op("QuantizeLinear", [x, sn, zn], base)
            return em.op("DequantizeLinear", [q, sn, zn], base), f"QuantizeLinear/DequantizeLinear({a.bits}-bit)"
        return (_emulate(em, x, em.scalar(s), em.scalar(float(z)), qmin, qmax, base),
                f"float fake-quant({a.bits}-bit static)")
    key = ("fq", x, act_key(a))
    if key not in em.cache:
        s, z = dynamic_qparams(em, x, a, base)
        em.cache[key] = _emulate(em, x, s, z, qmin, qmax, base)
    return em.cache[key], f"ReduceMin/ReduceMax + float fake-quant({a.bits}-bit dynamic per {a.granularity})"


