"""Map a quantized classifier (static integer activations, integer weights) onto an integer `Program`.

Each quantized layer becomes an integer matrix product on centered codes (q - z); everything up to
the next layer's input quantizer (bias, BatchNorm, average pooling, ReLU, max pooling, flatten and the
next layer's smoothing scale and activation scale) folds into one requantization per output element:
    x_next = clamp(floor((m * acc + n) / 2^F), lo, hi),  m = round(M 2^F), n = round(N 2^F) + 2^(F-1)
with M, N the float affine map of the PyTorch model. Max pooling runs on the accumulators (it commutes
with every monotone map that follows; channels whose map has a negative slope get their weights
negated first, so every m >= 0). The last layer gives integer logits m * acc + n (logits * 2^F).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from ...errors import SecquantError
from ...quant.modules import QuantConv2d, QuantLinear
from ...quant.primitives import PerTensor, qrange, quantize
from .program import Program, analyse, conv_index, pool_index

DEFAULT_PRECISION_BITS = 24  # bits of each requantization multiplier (see bench/RESULTS.md, private inference)


class UnsupportedLayerError(SecquantError):
    """A layer the secret-shared backend cannot compute exactly in integers."""


class _LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (QuantConv2d, QuantLinear)) or super().is_leaf_module(m, qualname)


def _unsupported(name: str, what: str, hint: str = "") -> UnsupportedLayerError:
    supported = ("supported: quantized Linear and Conv2d (integer per-channel or per-tensor weights, static "
                 "per-tensor activations), BatchNorm after them, ReLU, MaxPool2d, AvgPool2d, Flatten, "
                 "Dropout/Identity")
    return UnsupportedLayerError(f"private inference cannot compute layer {name!r} ({what}){': ' + hint if hint else ''}; "
                                 f"{supported}")


def trace_chain(module: nn.Module) -> list[tuple[str, str, object]]:
    """The model as a straight chain of (name, kind, module-or-args); refuses branches and unknown ops."""
    try:
        graph = _LeafTracer().trace(module)
    except Exception as e:  # data-dependent control flow, unsupported Python in forward
        raise UnsupportedLayerError(f"private inference needs a model torch.fx can trace as a chain of layers: "
                                    f"{type(e).__name__}: {e}") from None
    mods = dict(module.named_modules())
    chain: list[tuple[str, str, object]] = []
    prev = None
    for node in graph.nodes:
        if node.op == "placeholder":
            if prev is not None:
                raise UnsupportedLayerError("private inference supports models with one input tensor")
            prev = node
            continue
        if node.op == "output":
            if node.args[0] is not prev:
                raise UnsupportedLayerError("the model's output is not the last layer's output (branching model)")
            break
        others = [a for a in node.all_input_nodes if a is not prev]
        if not node.args or node.args[0] is not prev or others:
            raise _unsupported(str(node.target), "a branch or a second input", "the model must be a chain")
        chain.append(_classify(node, mods))
        prev = node
    return chain


def _classify(node, mods) -> tuple[str, str, object]:
    if node.op == "call_module":
        name, m = node.target, mods[node.target]
        if isinstance(m, (QuantConv2d, QuantLinear)):
            return name, "layer", m
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            return name, "bn", m
        if isinstance(m, nn.ReLU):
            return name, "relu", m
        if isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            return name, "maxpool" if isinstance(m, nn.MaxPool2d) else "avgpool", m
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                raise _unsupported(name, f"Flatten({m.start_dim}, {m.end_dim})", "only flatten from dim 1")
            return name, "flatten", m
        if isinstance(m, (nn.Identity, nn.Dropout)):
            return name, "identity", m
        hint = "it is not quantized (float weights)" if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)) else ""
        raise _unsupported(name, type(m).__name__, hint)
    name = getattr(node.target, "__name__", str(node.target))
    if node.op == "call_function" and node.target in (F.relu, torch.relu) and not node.kwargs.get("inplace"):
        return name, "relu", None
    flat_args = tuple(node.args[1:]) + tuple(node.kwargs.values())
    if (node.op == "call_function" and node.target is torch.flatten) or (node.op == "call_method" and node.target == "flatten"):
        if flat_args in ((1,), (1, -1)):
            return name, "flatten", None
    if node.op == "call_method" and node.target == "relu":
        return name, "relu", None
    raise _unsupported(name, f"{node.op} {name}")


def _act_qparams(layer_name: str, layer) -> tuple[float, int, int, int]:
    aq = layer.input_quant
    if aq is None:
        raise _unsupported(layer_name, f"{layer.layer_type} with float activations",
                           "quantize with a static integer-activation preset such as w8a8")
    a = aq.args
    if a.dynamic:
        raise _unsupported(layer_name, f"{layer.layer_type} with dynamic activation ranges",
                           "ranges computed from each input need secure division; use static ranges (w8a8)")
    if a.granularity != "tensor":
        raise _unsupported(layer_name, f"{a.granularity} activation quantization", "use per-tensor")
    qmin, qmax = qrange(a.bits, a.is_signed)
    return float(aq.scale), int(aq.zero_point), int(qmin), int(qmax)


def _int_weight(layer_name: str, layer) -> tuple[np.ndarray, np.ndarray]:
    """Signed integer weights [rows, cols] (int64) and the float scale per row."""
    a = layer.weight_args
    if a is None or a.format != "int":
        raise _unsupported(layer_name, f"{layer.layer_type} with {'float' if a is None else a.format} weights",
                           "weights must be uniform integers")
    if a.granularity not in ("channel", "tensor") or (a.granularity == "channel" and a.axis not in (0, -2)):
        raise _unsupported(layer_name, f"{a.granularity} weight scales",
                           "use per-output-channel or per-tensor weight scales (e.g. w8a8, w4a4, w2a8)")
    if isinstance(layer, QuantLinear) and layer.rotation_block is not None:
        raise _unsupported(layer_name, "Hadamard-rotated Linear", "rotation recipes are not supported")
    if isinstance(layer, QuantConv2d) and (layer.groups != 1 or tuple(layer.dilation) != (1, 1)
                                           or isinstance(layer.padding, str)):
        raise _unsupported(layer_name, "grouped, dilated or string-padded Conv2d")
    codes = layer.weight_codes().to(torch.int64)
    zp = layer.weight_zero_point.to(torch.int64)
    zp = zp.reshape(-1, 1) if zp.ndim else zp
    w = (codes - zp).numpy()
    scale = layer.weight_scale.double().reshape(-1).numpy()
    return w, np.broadcast_to(scale, (w.shape[0],)).copy()


def _shift_for(values: np.ndarray, precision_bits: int) -> int:
    top = float(np.max(values)) if values.size else 0.0
    if top <= 0:
        return precision_bits
    return max(1, precision_bits - math.ceil(math.log2(top)))


def compile_program(module: nn.Module, sample_shape: tuple[int, ...],
                    precision_bits: int = DEFAULT_PRECISION_BITS, exact: bool = True) -> Program:
    """The integer program computing `module` (a quantized classifier) on one sample of `sample_shape`.
    `exact=False` lets the engine round requantizations probabilistically (cheaper; not bit-exact)."""
    if not 8 <= precision_bits <= 48:
        raise SecquantError("precision_bits must be between 8 and 48")
    chain = trace_chain(module)
    layers = [i for i, (_, kind, _) in enumerate(chain) if kind == "layer"]
    if not layers:
        raise UnsupportedLayerError("the model has no quantized Linear or Conv2d layer")
    shape = tuple(int(s) for s in sample_shape)
    prefix_flatten = False
    for name, kind, _ in chain[:layers[0]]:
        if kind == "flatten":
            prefix_flatten, shape = True, (int(np.prod(shape)),)
        elif kind != "identity":
            raise _unsupported(name, kind, "nothing but Flatten may come before the first quantized layer")
    first_name, _, first = chain[layers[0]]
    s0, z0, qmin0, qmax0 = _act_qparams(first_name, first)
    smooth0 = None
    if isinstance(first, QuantLinear) and first.smooth_scale is not None:
        smooth0 = first.smooth_scale.double().tolist()
    prog = Program(ops=[], input={"scale": s0, "zero_point": z0, "qmin": qmin0, "qmax": qmax0, "lo": qmin0 - z0,
                                  "hi": qmax0 - z0, "shape": list(shape), "sample_shape": list(sample_shape),
                                  "flatten": prefix_flatten, "smooth": smooth0})
    s_in = s0
    for j, li in enumerate(layers):
        name, _, layer = chain[li]
        end = layers[j + 1] if j + 1 < len(layers) else len(chain)
        shape, s_in = _segment(prog, name, layer, chain[li + 1:end], shape, s_in,
                               chain[end] if end < len(chain) else None, precision_bits)
    for op in prog.ops:
        if op["op"] == "requant":
            op["exact"] = exact
    return analyse(prog)


def _segment(prog: Program, name: str, layer, epilogue, shape, s_in: float, nxt, precision_bits: int):
    """Emit one layer, its pooling, and its requantization (or the logits); return (shape, next input scale)."""
    w, sw = _int_weight(name, layer)
    i_w = len(prog.ops)
    if isinstance(layer, QuantConv2d):
        if len(shape) != 3 or shape[0] != layer.weight_shape[1]:
            raise _unsupported(name, f"Conv2d on an input of shape {shape}")
        pad = tuple(int(p) for p in layer.padding)
        stride = tuple(int(s) for s in layer.stride)
        kernel = tuple(layer.weight_shape[2:])
        _, ho, wo = conv_index(*shape, kernel, stride, pad)
        prog.ops.append({"op": "conv", "name": name, "in_shape": list(shape), "kernel": list(kernel),
                         "stride": list(stride), "padding": list(pad), "out_shape": [w.shape[0], ho, wo]})
        shape = (w.shape[0], ho, wo)
        chan = np.repeat(np.arange(w.shape[0]), ho * wo)
    else:
        if len(shape) != 1 or shape[0] != layer.in_features:
            raise _unsupported(name, f"Linear({layer.in_features}) on an input of shape {shape}",
                               "flatten its input first")
        prog.ops.append({"op": "dense", "name": name, "in_shape": list(shape), "out_shape": [w.shape[0]]})
        shape = (w.shape[0],)
        chan = np.arange(w.shape[0])
    a = s_in * sw                                       # float value = a[c] * acc + b[c]
    b = layer.bias.detach().double().numpy().copy() if layer.bias is not None else np.zeros(w.shape[0])
    relu = False
    for ename, kind, m in epilogue:
        if kind == "identity":
            continue
        if kind == "relu":
            relu = True
        elif kind == "bn":
            if relu:
                raise _unsupported(ename, "BatchNorm after a ReLU", "only BatchNorm before the nonlinearity folds")
            if m.num_features != len(a) or not m.track_running_stats:
                raise _unsupported(ename, "BatchNorm without running statistics or on another layer's channels")
            with torch.no_grad():
                g = (m.weight.double() if m.weight is not None else torch.ones(len(a), dtype=torch.float64)) \
                    / torch.sqrt(m.running_var.double() + m.eps)
                h = (m.bias.double() if m.bias is not None else 0) - m.running_mean.double() * g
            a, b = a * g.numpy(), b * g.numpy() + h.numpy()
        elif kind in ("maxpool", "avgpool"):
            if len(shape) != 3:
                raise _unsupported(ename, f"pooling a flat tensor of shape {shape}")
            k, st = m.kernel_size, m.stride if m.stride is not None else m.kernel_size
            k = (k, k) if isinstance(k, int) else tuple(k)
            st = (st, st) if isinstance(st, int) else tuple(st)
            p = m.padding if isinstance(m.padding, tuple) else (m.padding, m.padding)
            extra = kind == "maxpool" and (m.dilation not in (1, (1, 1)) or m.return_indices)
            if any(p) or m.ceil_mode or extra or (kind == "avgpool" and m.divisor_override is not None):
                raise _unsupported(ename, f"{type(m).__name__} with padding, ceil_mode, dilation or a divisor")
            if kind == "avgpool" and relu:
                raise _unsupported(ename, "AvgPool2d after a ReLU", "average pooling must precede the ReLU")
            idx, ho, wo = pool_index(*shape, k, st)
            prog.ops.append({"op": "maxpool" if kind == "maxpool" else "sumpool", "name": ename,
                             "in_shape": list(shape), "kernel": list(k), "stride": list(st)})
            shape, chan = (shape[0], ho, wo), chan[idx[0]]
            if kind == "avgpool":
                a = a / (k[0] * k[1])
        elif kind == "flatten":
            shape = (int(np.prod(shape)),)
    neg = a < 0                                          # fold negative slopes into the weights: every m >= 0
    w[neg] *= -1
    a = np.abs(a)
    prog.secrets[f"{i_w}.weight"] = w
    a_el, b_el = a[chan], b[chan]
    if nxt is None:
        if relu:
            raise _unsupported(name, "a ReLU after the last layer", "the last layer must give the logits")
        f = _shift_for(a_el, precision_bits)
        i = len(prog.ops)
        prog.ops.append({"op": "logits", "shift": f, "out_shape": list(shape)})
        prog.secrets[f"{i}.mult"] = np.round(a_el * 2.0 ** f).astype(np.int64)
        prog.secrets[f"{i}.offset"] = np.round(b_el * 2.0 ** f).astype(np.int64)
        return shape, None
    nname, kind, nlayer = nxt
    if kind != "layer":
        raise _unsupported(nname, kind)
    s_next, z, qmin, qmax = _act_qparams(nname, nlayer)
    s_el = np.full(len(chan), s_next)
    if isinstance(nlayer, QuantLinear):
        if nlayer.smooth_scale is not None:
            if len(shape) != 1:
                raise _unsupported(nname, "Linear on an unflattened input")
            s_el = s_el * nlayer.smooth_scale.double().numpy()
    M, N = a_el / s_el, b_el / s_el
    f = _shift_for(M, precision_bits)
    i = len(prog.ops)
    prog.ops.append({"op": "requant", "shift": f, "lo": max(0, qmin - z) if relu else qmin - z, "hi": qmax - z,
                     "out_shape": list(shape)})
    prog.secrets[f"{i}.mult"] = np.round(M * 2.0 ** f).astype(np.int64)
    prog.secrets[f"{i}.offset"] = (np.round(N * 2.0 ** f) + 2 ** (f - 1)).astype(np.int64)
    return shape, s_next


def encode_inputs(spec: dict, x: torch.Tensor) -> np.ndarray:
    """The client's side: raw samples [N, *sample_shape] -> centered integer input codes [N, D] (int64)."""
    x = x.detach().float()  # float32, as the PyTorch model computes its first input quantizer
    x = x.reshape(x.shape[0], -1) if spec["flatten"] else x
    if spec["smooth"] is not None:
        x = x / torch.tensor(spec["smooth"], dtype=torch.float32)
    q = quantize(x, torch.tensor(spec["scale"]), torch.tensor(spec["zero_point"]),
                 _bits(spec["qmin"], spec["qmax"]), spec["qmin"] < 0, PerTensor())
    return (q.to(torch.int64) - spec["zero_point"]).reshape(x.shape[0], -1).numpy()


def _bits(qmin: int, qmax: int) -> int:
    return int(qmax - qmin).bit_length()
