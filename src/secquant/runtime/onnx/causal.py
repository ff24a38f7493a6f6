"""ONNX export of a quantized transformers causal LM's decoder: input_ids + attention_mask in, logits out.

The decoder is traced like every secquant model (see the package docstring): its float parts (embeddings
left in float, RMSNorm/LayerNorm, rotary embeddings, eager attention, the causal mask) by torch.onnx, each
quantized layer rewritten from its own integer codes -- weight-only Linear layers (w8a16, w4a16, w3a16, GPTQ)
become com.microsoft::MatMulNBits, w8a8 layers integer GEMMs (MatMulIntegerToFloat), quantized embedding
tables GatherBlockQuantized.

By default there is **no KV cache**: the graph computes the logits of every position of the whole sequence in
one call (`logits[b, t]` predicts token t + 1), as a scoring / prefill model does; generating with it re-runs
the full sequence for each new token. Batch and sequence length are dynamic; right padding is masked by
`attention_mask`.

With `kv_cache=True` the graph also takes `past_key_values.{i}.key` / `.value` ([batch, kv_heads, past, head_dim]
per decoder layer, past length 0 for the first call) and returns `present.{i}.key` / `.value` (past + new
positions), the layout of Hugging Face's ONNX decoders: `attention_mask` then covers past and new tokens, and
position ids are derived from it (cumulative sum - 1), so left-padded batches decode correctly. Prefill with an
empty past, then feed one token per step with the presents as the next pasts.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ...errors import SecquantError
from ...models.base import GraphIO
from .export import GRAPH_BUILDERS, _run_torch, _set_info, build_onnx, commit_onnx, validate_onnx
from .info import DEFAULT_OPSET, require_onnx

INPUTS = ["input_ids", "attention_mask"]
OUTPUT = "logits"


class CausalLMLogits(nn.Module):
    """A transformers causal LM as a function of (input_ids, attention_mask) returning only the logits
    (no cache): what the graph is traced from."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits


def _cache_kwarg(lm: nn.Module) -> str:
    import inspect

    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


class CausalLMWithCache(nn.Module):
    """(input_ids, attention_mask, past keys and values flattened layer by layer) -> (logits, presents flattened)."""

    def __init__(self, lm: nn.Module, layers: int) -> None:
        super().__init__()
        self.lm, self.layers = lm, layers
        self.kwarg = _cache_kwarg(lm)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor):
        from transformers import DynamicCache

        cache = DynamicCache(ddp_cache_data=[(past[2 * i], past[2 * i + 1]) for i in range(self.layers)],
                             config=self.lm.config)
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past[0].shape[2]:]
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                      **{self.kwarg: cache})
        present = getattr(out, "cache", None) or out.past_key_values
        flat = [t for layer in present.layers for t in (layer.keys, layer.values)]
        return (out.logits, *flat)


def _cache_names(layers: int) -> tuple[list[str], list[str]]:
    return ([f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")],
            [f"present.{i}.{k}" for i in range(layers) for k in ("key", "value")])


class CausalLMCacheGraph:
    """Graph glue for the decoder with a KV cache; the sample's past is `past` (a list of 2 * layers tensors)."""

    kind = "causal-lm"

    def __init__(self, shapes: list[tuple[int, ...]]) -> None:
        self.shapes = shapes  # [kv_heads, head_dim] per cached tensor
        self.past_names, self.present_names = _cache_names(len(shapes) // 2)

    def graph_io(self, sample: dict) -> GraphIO:
        names = list(INPUTS) + self.past_names
        axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total"},
                OUTPUT: {0: "batch", 1: "sequence"}}
        axes.update({n: {0: "batch", 2: "past"} for n in self.past_names})
        axes.update({n: {0: "batch", 2: "total"} for n in self.present_names})
        return GraphIO(names, (sample["input_ids"], sample["attention_mask"], *sample["past"]), None, OUTPUT, axes)

    def feeds(self, batch: dict, input_names: list[str]) -> dict[str, np.ndarray]:
        """Feeds of a prefill call: the batch and an empty past."""
        b = int(np.shape(batch["input_ids"])[0])
        feeds = {n: np.asarray(batch[n], dtype=np.int64) for n in INPUTS}
        feeds.update({n: np.zeros((b, s[0], 0, *s[1:]), np.float32) for n, s in zip(self.past_names, self.shapes)})
        return {n: feeds[n] for n in input_names}


def _cache_shapes(module: nn.Module, sample: dict) -> list[tuple[int, ...]]:
    """[kv_heads, head_dim] of each cached tensor, read from one eager call with the cache on."""
    with torch.no_grad():
        out = module(input_ids=sample["input_ids"][:1, :1], use_cache=True)
    present = getattr(out, "cache", None) or out.past_key_values
    return [tuple(t.shape[1:2]) + tuple(t.shape[3:]) for layer in present.layers for t in (layer.keys, layer.values)]


def _rename_outputs(proto, names: list[str]) -> None:
    """Give the traced graph's outputs after the first the names `names` (the exporter names only the first)."""
    g = proto.graph
    for o, new in zip(list(g.output)[1:], names):
        old = o.name
        for n in g.node:
            for k, x in enumerate(n.output):
                if x == old:
                    n.output[k] = new
            for k, x in enumerate(n.input):
                if x == old:
                    n.input[k] = new
        o.name = new


class CausalLMGraph:
    """The graph glue build_onnx asks a model's adapter for (kind, inputs and output, feeds, a run)."""

    kind = "causal-lm"

    def graph_io(self, sample: dict[str, torch.Tensor]) -> GraphIO:
        axes = {n: {0: "batch", 1: "sequence"} for n in INPUTS}
        return GraphIO(list(INPUTS), (), {n: sample[n] for n in INPUTS}, OUTPUT,
                       {**axes, OUTPUT: {0: "batch", 1: "sequence"}})

    def run(self, module: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return module(batch["input_ids"], batch["attention_mask"])

    def feeds(self, batch: dict[str, torch.Tensor], input_names: list[str]) -> dict[str, np.ndarray]:
        return {n: np.asarray(batch[n], dtype=np.int64) for n in input_names}


def causal_sample(vocab_size: int, batch: int = 2, length: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """Integer (int64) dummy inputs: token ids below `vocab_size`, the second row right-padded."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, length), generator=g, dtype=torch.long)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1:, length // 2 + 1:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _checked_sample(module: nn.Module, sample) -> dict[str, torch.Tensor]:
    vocab = getattr(getattr(module, "config", None), "vocab_size", None)
    if sample is None:
        if vocab is None:
            raise SecquantError("the model has no config.vocab_size: pass a sample batch (input_ids, attention_mask)")
        return causal_sample(int(vocab))
    if not isinstance(sample, dict) or "input_ids" not in sample:
        raise SecquantError("the sample must be a dict with input_ids (and attention_mask), as a tokenizer returns it")
    ids = torch.as_tensor(sample["input_ids"])
    if ids.dtype not in (torch.int32, torch.int64) or ids.dim() != 2:
        raise SecquantError(f"input_ids must be a 2-D integer tensor [batch, sequence], got {ids.dtype} {tuple(ids.shape)}")
    if vocab is not None and (ids.min() < 0 or ids.max() >= vocab):
        raise SecquantError(f"input_ids must lie in [0, {vocab}) (the model's vocabulary)")
    mask = torch.as_tensor(sample.get("attention_mask", torch.ones_like(ids)))
    return {"input_ids": ids.long(), "attention_mask": mask.long()}


def build_causal_onnx(module: nn.Module, sample=None, *, opset: int = DEFAULT_OPSET, strict: bool = False,
                      accuracy_level: int = 0, quantized: bool = True, kv_cache: bool = False):
    """(ModelProto, ExportInfo) of a causal LM's decoder, in memory; layer names as in `module`."""
    require_onnx()
    sample = _checked_sample(module, sample)
    if kv_cache:
        shapes = _cache_shapes(module, sample)
        layers = len(shapes) // 2
        b = sample["input_ids"].shape[0]
        past = [torch.zeros(b, s[0], 2, *s[1:]) for s in shapes]  # traced with 2 past positions (dynamic axis)
        sample = {"input_ids": sample["input_ids"], "past": past,
                  "attention_mask": torch.cat([torch.ones(b, 2, dtype=torch.long), sample["attention_mask"]], 1)}
        wrapper, graph = CausalLMWithCache(module, layers).eval(), CausalLMCacheGraph(shapes)
    else:
        wrapper, graph = CausalLMLogits(module).eval(), CausalLMGraph()
    cfg = getattr(module, "config", None)
    before = getattr(cfg, "_attn_implementation", None)
    try:
        if cfg is not None and before is not None:
            cfg._attn_implementation = "eager"  # MatMul/Softmax attention: traceable, and ORT fuses it
        proto, info = build_onnx(wrapper, graph, sample, opset=opset, strict=strict,
                                 accuracy_level=accuracy_level, quantized=quantized)
    finally:
        if cfg is not None and before is not None:
            cfg._attn_implementation = before
    if kv_cache:
        _rename_outputs(proto, graph.present_names)
    for rec in info.layers:
        rec.name = rec.name.removeprefix("lm.")
    _set_info(proto, info)
    return proto, info


def _artifact_graph(module: nn.Module, adapter, sample, **options):
    """What `secquant export` builds for a causal-lm artifact: the decoder without a KV cache."""
    return build_causal_onnx(module, sample, **options)


GRAPH_BUILDERS["causal-lm"] = _artifact_graph


def export_causal_onnx(module: nn.Module, sample=None, path: str | os.PathLike = "model.onnx", *,
                       opset: int = DEFAULT_OPSET, strict: bool = False, accuracy_level: int = 0,
                       validate: bool = True, quantized: bool = True, kv_cache: bool = False,
                       external_data_threshold: int = 2**31 - 1) -> Path:
    """Write a (secquant-quantized) transformers causal LM as ONNX at `path` and return it: logits only (no KV
    cache), or with `kv_cache=True` past keys/values in and presents out (see the module docstring).

    `sample` is a dict with int64 `input_ids` [batch, sequence] and `attention_mask` (default: random token ids
    of the model's vocabulary, one row right-padded). Unless `validate=False` the written file is run by ONNX
    Runtime on the sample and compared with the PyTorch model (export.agrees); a mismatch raises and nothing is
    written (with a KV cache: a prefill call with an empty past). `quantized=False` exports every layer as a
    float layer (a baseline). Other options as for export_onnx."""
    out = Path(path)
    if out.suffix != ".onnx":
        raise SecquantError(f"{out}: the ONNX file name must end in .onnx")
    sample = _checked_sample(module, sample)
    proto, _ = build_causal_onnx(module, sample, opset=opset, strict=strict, accuracy_level=accuracy_level,
                                 quantized=quantized, kv_cache=kv_cache)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        check = None
        if validate:
            ref = _run_torch(CausalLMLogits(module).eval(), CausalLMGraph(), sample)
            graph = CausalLMCacheGraph(_cache_shapes(module, sample)) if kv_cache else CausalLMGraph()
            check = (lambda path: validate_onnx(path, ref, graph, sample))
        commit_onnx(proto, out, staging, external_data_threshold, check, "the PyTorch model")
        del proto
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
