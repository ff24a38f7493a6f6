"""Tracing a quantized model with one placeholder node per quantized layer, then rewriting them."""

from __future__ import annotations

import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from ...errors import SecquantError
from .emitter import Emitter
from .info import MS, PLACEHOLDER, PLACEHOLDER_DOMAIN, TORCH_MAX_OPSET, LayerExport, placeholder_layer
from .layers import RewriteContext, plan_zero_point_rows, rewrite_conv, rewrite_embedding, rewrite_linear

# ----------------------------------------------------------------------------------------------
# Tracing with placeholders
# ----------------------------------------------------------------------------------------------

_ACTIVE: dict[str, nn.Module] = {}  # placeholder name -> quantized layer, while one trace runs
_OUT_RANK: dict[str, int] = {}
TRACE_LOCK = threading.Lock()


def _run_untraced(name: str, x: torch.Tensor):
    """The quantized layer `name` run eagerly on x, with tracing suspended (its output is not traced)."""
    state = torch._C._get_tracing_state()
    torch._C._set_tracing_state(None)
    try:
        with torch.no_grad():
            return _ACTIVE[name](x)
    finally:
        torch._C._set_tracing_state(state)


class _Placeholder(torch.autograd.Function):
    """Runs the quantized layer eagerly (untraced); exports as one secquant::QuantLayer node."""

    @staticmethod
    def forward(ctx, x, name):
        out = _run_untraced(name, x)
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


class _RecurrentPlaceholder(torch.autograd.Function):
    """A quantized LSTM / GRU run eagerly; exports as one secquant::QuantLayer node with its 2 or 3 outputs."""

    @staticmethod
    def forward(ctx, x, name):
        out, h = _run_untraced(name, x)
        return (out, *h) if isinstance(h, tuple) else (out, h)

    @staticmethod
    def symbolic(g, x, name):
        n = 3 if _ACTIVE[name].layer_type == "LSTM" else 2
        outs = g.op(f"{PLACEHOLDER_DOMAIN}::{PLACEHOLDER}", x, layer_s=name, outputs=n)
        for o in outs:
            try:
                o.setType(x.type().with_dtype(torch.float32).with_sizes([None] * 3))
            except Exception:  # pragma: no cover - type hints only help the exporter's shape inference
                pass
        return outs


class _RecurrentStub(nn.Module):
    def __init__(self, name: str) -> None:
        super().__init__()
        self.layer_name = name

    def forward(self, x, hx=None):
        if hx is not None or x.dim() != 3:
            raise SecquantError(f"layer {self.layer_name!r}: ONNX export of a quantized recurrent layer takes a "
                                "batch of sequences and no initial state")
        out, *h = _RecurrentPlaceholder.apply(x, self.layer_name)
        return out, (tuple(h) if len(h) == 2 else h[0])


def _quant_layers(root: nn.Module) -> dict[str, nn.Module]:
    from ...quant.modules import QuantGRU, QuantizedWeightMixin, QuantLSTM

    recurrent = {n: m for n, m in root.named_modules() if isinstance(m, (QuantLSTM, QuantGRU))}
    inside = tuple(f"{n}." for n in recurrent)  # their QuantMatrix children are no layers of their own
    return {**recurrent, **{n: m for n, m in root.named_modules()
                            if n and isinstance(m, QuantizedWeightMixin) and not n.startswith(inside)}}


def _set_sub(root: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, child, new)


def trace_model(module: nn.Module, adapter, sample, opset: int, path: Path,
                quantized: bool) -> tuple[list[str], str, dict[str, nn.Module], dict[str, int]]:
    """torch.onnx.export with every quantized layer swapped for a placeholder (all restored afterwards)."""
    layers = _quant_layers(module) if quantized else {}
    grads = {p: p.requires_grad for p in module.parameters()}
    transformer = getattr(module, "transformer", None)
    cfg = getattr(transformer, "config", None)
    attn_before = getattr(cfg, "_attn_implementation", None)
    was_training = module.training
    try:
        for n, m in layers.items():
            _set_sub(module, n, _RecurrentStub(n) if hasattr(m, "hidden_quants") else _Stub(n))
        _ACTIVE.clear()
        _ACTIVE.update(layers)
        _OUT_RANK.clear()
        for p in grads:
            p.requires_grad_(False)
        if cfg is not None and hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "eager"  # MatMul/Softmax attention: traceable, and ORT fuses it
        io = adapter.graph_io(sample)
        names, args, kwargs, output, axes = io.names, io.args, io.kwargs, io.output, io.axes
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


def simplify(model) -> None:
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


def rewrite_layers(model, layers: dict[str, nn.Module], ranks: dict[str, int], strict: bool,
             accuracy_level: int) -> list[LayerExport]:
    from onnx import helper

    from ...quant.modules import QuantConv1d, QuantConv2d, QuantConv3d, QuantEmbedding, QuantLinear
    from ...quant.modules.conv import TRANSPOSED
    from ...quant.modules import QuantGRU, QuantLSTM
    from .layers_conv import rewrite_conv_transpose
    from .layers_recurrent import rewrite_recurrent

    TRANSPOSED_TYPES = tuple(TRANSPOSED.values())

    graph = model.graph
    em = Emitter(graph)
    ctx = RewriteContext(em, strict, accuracy_level, ranks)
    ctx.zrows = plan_zero_point_rows(graph, layers)
    new_nodes, records = [], []
    for node in graph.node:
        if node.domain != PLACEHOLDER_DOMAIN:
            new_nodes.append(node)
            continue
        name = placeholder_layer(node)
        mod = layers[name]
        em.nodes = []
        x, y = node.input[0], node.output[0]
        if isinstance(mod, QuantLinear):
            rec = rewrite_linear(ctx, name, mod, x, y)
        elif isinstance(mod, (QuantConv2d, QuantConv1d, QuantConv3d)):
            rec = rewrite_conv(ctx, name, mod, x, y)
        elif isinstance(mod, TRANSPOSED_TYPES):
            rec = rewrite_conv_transpose(ctx, name, mod, x, y)
        elif isinstance(mod, (QuantLSTM, QuantGRU)):
            rec = rewrite_recurrent(ctx, name, mod, x, list(node.output))
        elif isinstance(mod, QuantEmbedding):
            rec = rewrite_embedding(ctx, name, mod, x, y)
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


