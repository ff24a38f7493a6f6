"""Each quantized layer rewritten into ONNX operators built from its own integer codes (see package docs)."""

from __future__ import annotations

import numpy as np
from torch import nn

from ...errors import SecquantError
from .emitter import Emitter, act_key, dynamic_qparams, fake_quant, static_qparams
from .info import MS, PLACEHOLDER_DOMAIN, LayerExport, placeholder_layer
from .weights import (WeightView, int8_kernel, is_pow2_block, kernel_bits, pack_bits, row_block, weight_view,
    zero_point_rows
)

# ----------------------------------------------------------------------------------------------
# Layer rewrites
# ----------------------------------------------------------------------------------------------

class RewriteContext:
    def __init__(self, em: Emitter, strict: bool, accuracy_level: int, ranks: dict[str, int | None]) -> None:
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


def _matmul_nbits(ctx: RewriteContext, x: str, w: WeightView, bias: np.ndarray | None, y: str, base: str) -> str:
    em = ctx.em
    nb = kernel_bits(w.bits)
    bs = w.group if w.gran == "group" else row_block(w.cols)
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


def _dq_codes(em: Emitter, w: WeightView, codes: np.ndarray, zp: np.ndarray, base: str) -> tuple[str, str, str]:
    """Integer initializers for codes and zero points: uint4 up to 4 bits, int8 for symmetric 8-bit, else uint8."""
    if w.bits <= 4:
        return em.const4(f"{base}.qweight", codes), em.const4(f"{base}.weight_zero_point", zp.astype(np.uint8)), "uint4"
    if w.signed_int8:
        return (em.const(f"{base}.qweight", (codes.astype(np.int16) - 128).astype(np.int8)),
                em.const(f"{base}.weight_zero_point", np.zeros(np.shape(zp), np.int8)), "int8")
    return em.const(f"{base}.qweight", codes), em.const(f"{base}.weight_zero_point", zp.astype(np.uint8)), "uint8"


_GRAN_NAME = {"tensor": "per tensor", "row": "per channel", "col": "per input channel"}


def _dq_weight_t(em: Emitter, w: WeightView, base: str) -> tuple[str, str]:
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


def rewrite_linear(ctx: RewriteContext, name: str, mod, x: str, y: str) -> LayerExport:
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
    if int8_kernel(mod):
        parts.append(_int8_linear(ctx, x, act, weight_view(mod), bias, y, base, mod.in_features))
        return LayerExport(name, "Linear", " -> ".join(parts), "int8")
    note = fallback = None
    if act is not None:
        x, d = fake_quant(em, x, act, base)
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
        w = weight_view(mod)
        if w.gran in ("tensor", "row") or (w.gran == "group" and is_pow2_block(w.group)):
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


def _rotation(em: Emitter, x: str, signs: np.ndarray, block: int, base: str) -> tuple[str, str]:
    """x R = ((x * signs) as [-1, block] rows) @ Hadamard, back in x's shape; shared by the layers
    (q, k, v) that rotate the same tensor alike."""
    from ...quant.primitives.rotation import hadamard

    key = ("rotate", x, signs.tobytes(), block)
    if key not in em.cache:
        flipped = em.op("Mul", [x, em.const(f"{base}.rotation_signs", signs)], base)
        rows = em.op("Reshape", [flipped, em.scalar([-1, block], np.int64)], base)
        if ("hadamard", block) not in em.cache:  # one initializer per block size
            em.cache[("hadamard", block)] = em.const(f"secquant.hadamard{block}", hadamard(block).numpy())
        mixed = em.op("MatMul", [rows, em.cache[("hadamard", block)]], base)
        em.cache[key] = em.op("Reshape", [mixed, em.op("Shape", [x], base)], base)
    return em.cache[key], f"Mul(rotation_signs) -> MatMul(Hadamard {block}, per block)"


def _int8_linear(ctx: RewriteContext, x: str, act, w: WeightView, bias, y: str, base: str, K: int) -> str:
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
        s, z = static_qparams(act)
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
    s, zf = dynamic_qparams(em, x, a, base)
    if a.granularity == "token" and a.symmetric:
        # Symmetric per token: the zero point is the same constant for every token (0 signed, 128
        # unsigned; signed codes are shifted into uint8 as code + 128), so it is a scalar zero point
        # of MatMulIntegerToFloat -- ORT's plain U8S8 GEMM, no zero-point rows. The codes come from one
        # blocked QuantizeLinear (one block per row), which divides by the scale as PyTorch does.
        key = ("symq", x, act_key(a))
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
    key = ("dynq", x, act_key(a))
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
    R = max(zero_point_rows(colsum), ctx.zrows.get(("zrows", x, act_key(a)), 0))
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


def plan_zero_point_rows(graph, layers: dict[str, nn.Module]) -> dict[tuple, int]:
    """Per-token int8 layers reading the same tensor share one quantized input: one row count for all."""
    from ...quant.modules import QuantLinear

    out: dict[tuple, int] = {}
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            continue
        mod = layers[placeholder_layer(node)]
        if not (isinstance(mod, QuantLinear) and int8_kernel(mod) and mod.smooth_scale is None
                and mod.rotation_block is None):
            continue
        a = mod.input_quant.args
        w = weight_view(mod)
        if a.dynamic and a.granularity == "token" and not a.symmetric and w.signed_int8:
            key = ("zrows", node.input[0], act_key(a))
            out[key] = max(out.get(key, 0), zero_point_rows(w.codes.astype(np.int64).sum(1) - 128 * w.cols))
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


def rewrite_conv(ctx: RewriteContext, name: str, mod, x: str, y: str) -> LayerExport:
    em, base = ctx.em, name
    wa, act = mod.weight_args, mod.input_quant
    parts: list[str] = []
    note = fallback = None
    if act is not None:
        x, d = fake_quant(em, x, act, base)
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
        w = weight_view(mod)
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


def rewrite_embedding(ctx: RewriteContext, name: str, mod, idx: str, y: str) -> LayerExport:
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
    w = weight_view(mod)
    nb = kernel_bits(w.bits)
    if w.gran in ("tensor", "row") or (w.gran == "group" and is_pow2_block(w.group)):
        bs = w.group if w.gran == "group" else row_block(D)
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


