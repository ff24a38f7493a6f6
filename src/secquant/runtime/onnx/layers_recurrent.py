"""ONNX rewrite of a weight-only quantized LSTM / GRU: one ONNX LSTM / GRU operator per layer whose W and R
inputs are DequantizeLinear of the stored integer codes (rows reordered from torch's gate order to ONNX's, an
exact permutation of codes and scales), biases as float initializers. ONNX Runtime runs the recurrence in float
on the dequantized weights: the graph computes what the PyTorch layer computes. A layer with quantized
activations (its inputs and hidden state quantized at every step) has no ONNX form and is refused."""

from __future__ import annotations

import numpy as np

from ...errors import SecquantError
from .info import LayerExport
from .layers import _GRAN_NAME, RewriteContext, _dq_codes
from .weights import weight_view

# ONNX gate order as indices into torch's: LSTM torch (i, f, g, o) -> ONNX (i, o, f, c); GRU torch (r, z, n) ->
# ONNX (z, r, h)
_GATES = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2]}


def _row_perm(kind: str, hidden: int) -> np.ndarray:
    return np.concatenate([np.arange(g * hidden, (g + 1) * hidden) for g in _GATES[kind]])


def _dq_matrix(ctx: RewriteContext, m, perm: np.ndarray, base: str) -> tuple[str, str]:
    """[1, rows, cols] float weight of one QuantMatrix from its codes, rows in ONNX gate order."""
    em = ctx.em
    if m.weight_args.format != "int":
        wf = m.dequantized_weight().detach().float().numpy()[perm]
        return em.op("Unsqueeze", [em.const(f"{base}.weight", wf), em.scalar([0], np.int64)], base), "float"
    w = weight_view(m)
    codes = w.codes[perm]
    scale, zp = np.asarray(w.scale, np.float32), np.asarray(w.zp)
    if w.gran in ("row", "group"):
        scale, zp = scale[perm], zp[perm]
    attrs = {"tensor": {}, "row": {"axis": 0}, "col": {"axis": 1}}.get(w.gran) or \
        {"axis": 1, "block_size": int(w.group)}
    q, zn, dt = _dq_codes(em, w, codes, zp, base)
    deq = em.op("DequantizeLinear", [q, em.const(f"{base}.weight_scale", np.ascontiguousarray(scale)), zn], base,
                **attrs)
    return em.op("Unsqueeze", [deq, em.scalar([0], np.int64)], base), \
        f"DequantizeLinear({dt}, {_GRAN_NAME.get(w.gran, f'blocked {w.group}')})"


def _bias(mod, sfx: str, perm: np.ndarray) -> np.ndarray:
    rows = len(perm)
    parts = []
    for kind in ("ih", "hh"):
        b = getattr(mod, f"bias_{kind}{sfx}")
        parts.append(np.zeros(rows, np.float32) if b is None else b.detach().float().numpy()[perm])
    return np.concatenate(parts)


def rewrite_recurrent(ctx: RewriteContext, name: str, mod, x: str, outputs: list[str]) -> LayerExport:
    """`outputs`: the placeholder's (output, h_n[, c_n]) names, shaped as torch returns them."""
    em, kind, H = ctx.em, mod.layer_type, mod.hidden_size
    if mod.input_quants is not None:
        raise SecquantError(f"layer {name!r}: a quantized {kind} with quantized activations (its inputs and hidden "
                            "state quantized at every step) has no ONNX form; export a weight-only artifact "
                            "(w8a16, w4a16) or evaluate and serve it with the PyTorch runtime")
    fallback = None
    if mod.weight_args.format != "int":
        fallback = ctx.fallback(name, f"{mod.weight_args.format} codebook weights have no ONNX Runtime kernel")
    ndir = 2 if mod.bidirectional else 1
    perm = _row_perm(kind, H)
    seq = em.op("Transpose", [x], name, perm=[1, 0, 2]) if mod.batch_first else x  # [T, B, F]
    finals: list[list[str]] = [[], []]
    desc = ""
    for layer in range(mod.num_layers):
        sfxs = [f"_l{layer}" + ("_reverse" if d else "") for d in range(ndir)]
        ws, rs = [], []
        for sfx in sfxs:
            w, desc = _dq_matrix(ctx, getattr(mod, f"weight_ih{sfx}"), perm, f"{name}.weight_ih{sfx}")
            r, _ = _dq_matrix(ctx, getattr(mod, f"weight_hh{sfx}"), perm, f"{name}.weight_hh{sfx}")
            ws.append(w), rs.append(r)
        W = ws[0] if ndir == 1 else em.op("Concat", ws, name, axis=0)
        R = rs[0] if ndir == 1 else em.op("Concat", rs, name, axis=0)
        B = em.const(f"{name}.bias_l{layer}", np.stack([_bias(mod, sfx, perm) for sfx in sfxs]))
        attrs = {"hidden_size": H, "direction": "bidirectional" if ndir == 2 else "forward"}
        if kind == "GRU":
            attrs["linear_before_reset"] = 1  # torch applies the reset gate after the hidden projection
        outs = em.op(kind, [seq, W, R, B], name, outputs=3 if kind == "LSTM" else 2, **attrs)
        y = outs[0]  # [T, ndir, B, H]
        for i, state in enumerate(outs[1:]):
            finals[i].append(state)  # [ndir, B, H]
        seq = em.op("Reshape", [em.op("Transpose", [y], name, perm=[0, 2, 1, 3]), em.scalar([0, 0, -1], np.int64)],
                    name)  # [T, B, ndir * H]
    em.op("Transpose" if mod.batch_first else "Identity", [seq], name, outputs=[outputs[0]],
          **({"perm": [1, 0, 2]} if mod.batch_first else {}))
    for i, out in enumerate(outputs[1:]):
        states = finals[i]
        em.op("Concat" if len(states) > 1 else "Identity", states, name, outputs=[out],
              **({"axis": 0} if len(states) > 1 else {}))
    return LayerExport(name, kind, f"{desc} -> {kind} (float recurrence on the dequantized weights)",
                       "dequantize" if fallback is None else "float", "int" if fallback is None else "float", fallback,
                       f"ONNX Runtime's {kind} runs in float: the integer weights are dequantized at load time")
