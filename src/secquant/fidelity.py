"""Fidelity, size and latency of a quantized model against its float source."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save
from torch import nn

from .models.base import ModelHandle


def float_size_bytes(module: nn.Module) -> int:
    """Bytes of the float model serialized as fp32 safetensors (exact, header included)."""
    sd = {k: v.detach().float().contiguous().clone() for k, v in module.state_dict().items()
          if v.is_floating_point()}
    sd.update({k: v.detach().contiguous().clone() for k, v in module.state_dict().items() if not v.is_floating_point()})
    return len(save(sd))


@torch.no_grad()
def compare(quant: nn.Module, ref: nn.Module, handle: ModelHandle, data: str | Path | None = None,
            batch_size: int = 32, progress: Callable[[int], None] | None = None,
            runner: Callable[[Any], torch.Tensor] | None = None, runtime: str | None = None) -> dict[str, Any]:
    """Run both models over the evaluation batches; accuracy for labelled data, the adapter's own scorer when it
    has one (perplexity for causal LMs), else mean cosine.

    Latency is the median wall time per batch of each model. The quantized model runs in eager
    PyTorch unless `runner` (a batch -> outputs callable, e.g. an ONNX Runtime session) is given,
    with `runtime` describing it.
    """
    quant.eval()
    ref.eval()
    q_ms, f_ms = [], []
    correct_q = correct_f = n = 0
    cos_sum = 0.0
    labelled = None
    scorer = handle.adapter.scorer()
    for inputs, labels in handle.adapter.eval_batches(data, batch_size):
        t0 = time.perf_counter()
        out_q = runner(inputs) if runner is not None else handle.run(quant, inputs)
        t1 = time.perf_counter()
        out_f = handle.run(ref, inputs)
        t2 = time.perf_counter()
        q_ms.append((t1 - t0) * 1e3)
        f_ms.append((t2 - t1) * 1e3)
        labelled = labels is not None if labelled is None else labelled
        if scorer is not None:
            scorer.add(inputs, out_q, out_f)
        if labels is not None:
            correct_q += int((out_q.argmax(-1) == labels).sum())
            correct_f += int((out_f.argmax(-1) == labels).sum())
        a, b = out_q.reshape(out_q.shape[0], -1).float(), out_f.reshape(out_f.shape[0], -1).float()
        cos_sum += float(torch.nn.functional.cosine_similarity(a, b, dim=-1).sum())
        n += out_q.shape[0]
        if progress:
            progress(out_q.shape[0])
    if n == 0:
        from .errors import CalibrationError
        raise CalibrationError("the evaluation data is empty")
    result: dict[str, Any] = {"n_samples": n, "batch_size": batch_size}
    if scorer is not None:
        result.update(scorer.result())
    elif labelled:
        result.update(metric="accuracy", value=correct_q / n, float_value=correct_f / n)
    else:
        result.update(metric="cosine", value=cos_sum / n, float_value=1.0)
    result["mean_cosine_to_float"] = cos_sum / n
    result["latency_ms"] = statistics.median(q_ms)
    result["float_latency_ms"] = statistics.median(f_ms)
    result["runtime"] = runtime or f"torch-eager ({torch.get_num_threads()} threads; integer math simulated in float)"
    result["float_runtime"] = f"torch-eager ({torch.get_num_threads()} threads)"
    return result
