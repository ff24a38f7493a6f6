"""ONNX rewrite of quantized transposed convolutions (ConvTranspose1d/2d/3d): the stored integer codes
[out, in / g * k] dequantized by DequantizeLinear, put back into ONNX's (and torch's) [in, out / g, *k] layout by
Reshape / Transpose, then ConvTranspose. Conv3d goes through layers.rewrite_conv like Conv1d/2d."""

from __future__ import annotations

import numpy as np

from .emitter import fake_quant
from .info import LayerExport
from .layers import _GRAN_NAME, RewriteContext, _dq_codes
from .weights import weight_view


def rewrite_conv_transpose(ctx: RewriteContext, name: str, mod, x: str, y: str) -> LayerExport:
    em, base = ctx.em, name
    wa, act = mod.weight_args, mod.input_quant
    parts: list[str] = []
    note = fallback = None
    if act is not None:
        x, d = fake_quant(em, x, act, base)
        parts.append(d)
    g, shape = int(mod.groups), tuple(mod.weight_shape)  # stored: [out, in/g, *k]
    k = shape[2:]
    if wa is None or wa.format != "int":
        if wa is not None:
            fallback = ctx.fallback(name, f"{wa.format} codebook weights have no ONNX Runtime kernel")
        wd = em.const(f"{base}.weight", mod.torch_weight().detach().float().numpy())
        kernel, weights = "float", "none" if wa is None else "float"
        parts.append("float weight" if wa is None else "dequantized float weight")
    else:
        w = weight_view(mod)
        q, zn, dt = _dq_codes(em, w, w.codes, w.zp, base)
        attrs = {"tensor": {}, "row": {"axis": 0}, "col": {"axis": 1}}.get(w.gran) or \
            {"axis": 1, "block_size": int(w.group)}
        w2 = em.op("DequantizeLinear", [q, em.const(f"{base}.weight_scale", np.asarray(w.scale, np.float32)), zn],
                   base, **attrs)
        grouped = em.op("Reshape", [w2, em.scalar([g, shape[0] // g, shape[1], *k], np.int64)], base)
        perm = [0, 2, 1] + list(range(3, 3 + len(k)))
        wd = em.op("Reshape", [em.op("Transpose", [grouped], base, perm=perm),
                               em.scalar([g * shape[1], shape[0] // g, *k], np.int64)], base)
        kernel, weights = "dequantize", "int"
        parts.append(f"DequantizeLinear({dt}, {_GRAN_NAME.get(w.gran, f'blocked {w.group}')}) -> Transpose")
        note = "ORT runs QDQ transposed convolutions in float"
    ins = [x, wd] + ([em.const(f"{base}.bias", mod.bias.detach().float().numpy())] if mod.bias is not None else [])
    em.op("ConvTranspose", ins, base, outputs=[y], kernel_shape=list(k), strides=list(mod.stride),
          dilations=list(mod.dilation), pads=list(mod.padding) * 2, output_padding=list(mod.output_padding), group=g)
    parts.append("ConvTranspose")
    return LayerExport(name, mod.layer_type, " -> ".join(parts), kernel, weights, fallback, note)
