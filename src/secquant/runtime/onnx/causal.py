"""ONNX export of a quantized transformers causal LM's decoder: input_ids + attention_mask in, logits out.

The decoder is traced like every secquant model (see the package docstring): its float parts (embeddings
left in float, RMSNorm/LayerNorm, rotary embeddings, eager attention, the causal mask) by torch.onnx, each
quantized layer rewritten from its own integer codes -- weight-only Linear layers (w8a16, w4a16, w3a16, GPTQ)
become com.microsoft::MatMulNBits, w8a8 layers integer GEMMs (MatMulIntegerToFloat), quantized embedding
tables GatherBlockQuantized.

**No KV cache.** The graph computes the logits of every position of the whole sequence in one call
(`logits[b, t]` predicts token t + 1), as a scoring / prefill model does. Generating with it re-runs the
full sequence for each new token; there are no `past_key_values` inputs or `present` outputs. Batch and
sequence length are dynamic; right padding is masked by `attention_mask`.
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
from .export import _run_torch, _save, _set_info, agrees, build_onnx, validate_onnx
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
                      accuracy_level: int = 0, quantized: bool = True):
    """(ModelProto, ExportInfo) of a causal LM's decoder, in memory; layer names as in `module`."""
    require_onnx()
    sample = _checked_sample(module, sample)
    wrapper = CausalLMLogits(module).eval()
    cfg = getattr(module, "config", None)
    before = getattr(cfg, "_attn_implementation", None)
    try:
        if cfg is not None and before is not None:
            cfg._attn_implementation = "eager"  # MatMul/Softmax attention: traceable, and ORT fuses it
        proto, info = build_onnx(wrapper, CausalLMGraph(), sample, opset=opset, strict=strict,
                                 accuracy_level=accuracy_level, quantized=quantized)
    finally:
        if cfg is not None and before is not None:
            cfg._attn_implementation = before
    for rec in info.layers:
        rec.name = rec.name.removeprefix("lm.")
    _set_info(proto, info)
    return proto, info


def export_causal_onnx(module: nn.Module, sample=None, path: str | os.PathLike = "model.onnx", *,
                       opset: int = DEFAULT_OPSET, strict: bool = False, accuracy_level: int = 0,
                       validate: bool = True, quantized: bool = True,
                       external_data_threshold: int = 2**31 - 1) -> Path:
    """Write a (secquant-quantized) transformers causal LM as ONNX at `path` and return it. No KV cache: see the
    module docstring.

    `sample` is a dict with int64 `input_ids` [batch, sequence] and `attention_mask` (default: random token ids
    of the model's vocabulary, one row right-padded). Unless `validate=False` the written file is run by ONNX
    Runtime on the sample and compared with the PyTorch model (export.agrees); a mismatch raises and nothing is
    written. `quantized=False` exports every layer as a float layer (a baseline). Other options as for
    export_onnx."""
    out = Path(path)
    if out.suffix != ".onnx":
        raise SecquantError(f"{out}: the ONNX file name must end in .onnx")
    sample = _checked_sample(module, sample)
    proto, _ = build_causal_onnx(module, sample, opset=opset, strict=strict, accuracy_level=accuracy_level,
                                 quantized=quantized)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        written = _save(proto, staging / out.name, external_data_threshold)
        del proto
        if validate:
            graph = CausalLMGraph()
            wrapper = CausalLMLogits(module).eval()
            v = validate_onnx(written[0], _run_torch(wrapper, graph, sample), graph, sample)
            if not agrees(v):
                raise SecquantError(
                    f"the exported ONNX decoder does not reproduce the PyTorch model (mean cosine "
                    f"{v['mean_cosine']:.6f}, worst {v['min_cosine']:.6f}, max abs difference "
                    f"{v['max_abs_diff']:.3g}); nothing was written")
        data = out.with_name(out.name + ".data")
        if len(written) == 2:
            os.replace(written[1], data)
        os.replace(written[0], out)
        if len(written) == 1 and data.exists():
            data.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out
