#!/usr/bin/env python
"""CPU inference speed: secquant's ONNX Runtime artifacts vs fp32 and peer int8 paths, 2 threads.

Run from the repository root:

    .venv/bin/python bench/speed.py [--repeats N]

One run measures, at torch.set_num_threads(2) and ONNX Runtime intra_op_num_threads=2 (inter-op 1,
sequential), with warmup runs and then N timed repeats taken in interleaved rounds (every variant once
per round, so machine load hits all variants alike), the median wall latency of:

  * builtin:minilm at batch 32 x seq 128 and batch 1 x seq 128 (inputs padded to 128 tokens), and
  * builtin:digits (the DigitsCNN) on a batch of 256 held-out images,

for: fp32 PyTorch; fp32 ONNX Runtime (plain, and after ORT's transformer fusions for MiniLM); ONNX
Runtime's own quantize_dynamic (per tensor and per channel, on the plain and on the transformer-fused
fp32 graph: ORT's documented deployment path is optimize first, then quantize); torch.ao dynamic int8;
torchao int8 dynamic activations + int8 weights (if it runs); secquant w8a8-dynamic, w8a8 (static) and
w4a16 artifacts exported with secquant.runtime.export_onnx and run by secquant.runtime.Session (w4a16 also
with the Hadamard rotation of the W4/W3 GPTQ presets, to show its run-time cost); and the
proposed symmetric per-token preset (w8a8-dynamic with symmetric activations) as its own row.

Fidelity: MiniLM -- mean cosine of each variant's sentence embeddings to the fp32 PyTorch embeddings
over the 256 built-in evaluation sentences (batch 32, padded to the longest in the batch); digits --
accuracy on the held-out split and top-1 agreement with fp32. Sizes: the variant's file (model.onnx,
model.safetensors, or torch.save of the state dict for PyTorch peers), ratio to the fp32 safetensors.

Prints one JSON line per result to stdout, progress to stderr, and writes bench/results_speed.md (table,
bars with numbers, exact command, date, machine and a contention note: other processes' CPU time during
the run from /proc/stat against this process's own). A peer that fails is a row with its error.
"""

from __future__ import annotations

import argparse
import copy
import io
import json
import logging
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import numpy as np
import torch
from torch import nn

torch.set_num_threads(2)

from machine import cpu_counters  # noqa: E402  (bench/machine.py, next to this script)
import secquant
from secquant.fidelity import float_size_bytes
from secquant.models import load_model
from secquant.models.encoder import builtin_sentences
from secquant.recipes import get_preset
from secquant.runtime import Session, export_float_onnx, export_onnx

THREADS = 2
HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "results_speed.md"
COMMAND = ".venv/bin/python bench/speed.py"
SLOW_S = 3.0  # a variant whose warmup run takes longer is timed on its own, with fewer repeats
DIGITS_BATCH = 256
SEQ = 128


T_START = time.perf_counter()
LOAD_START = os.getloadavg()
CPU_START = cpu_counters()
ROWS: list[dict] = []


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def emit(row: dict) -> dict:
    print(json.dumps(row), flush=True)
    ROWS.append(row)
    return row


# --------------------------------------------------------------------------- variants and timing

@dataclass
class Variant:
    """One way of running a model: `run(batch)` returns the output tensor for one batch."""

    tool: str
    method: str
    run: Callable | None = None
    size_bytes: int | None = None
    size_file: str | None = None
    note: str = ""
    error: str | None = None
    fidelity: dict = field(default_factory=dict)
    wall: dict = field(default_factory=dict)  # batch label -> [seconds]
    cpu: dict = field(default_factory=dict)
    timing_error: dict = field(default_factory=dict)


def ort_session(model, fused_note: str = ""):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    src = model if isinstance(model, bytes) else str(model)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


def ort_runner(sess, kind: str):
    names = [i.name for i in sess.get_inputs()]
    out = sess.get_outputs()[0].name

    def run(batch):
        if kind == "encoder":
            feeds = {n: np.asarray(batch[n], dtype=np.int64) if n in batch else np.zeros_like(
                np.asarray(batch["input_ids"], dtype=np.int64)) for n in names}
        else:
            feeds = {names[0]: np.ascontiguousarray(batch.numpy(), dtype=np.float32)}
        return torch.from_numpy(sess.run([out], feeds)[0])
    return run


def torch_runner(module: nn.Module, kind: str):
    def run(batch):
        with torch.inference_mode():
            out = module(**batch) if kind == "encoder" else module(batch)
        return out.float()
    return run


def torch_save_size(module: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def time_group(variants: list[Variant], batches: dict[str, object], repeats: int, warmup: int = 2) -> None:
    """Warmup, then `repeats` interleaved rounds per batch label (slow variants: on their own, 2 repeats)."""
    for label, batch in batches.items():
        fast, slow = [], []
        for v in variants:
            if v.run is None:
                continue
            try:
                t0 = time.perf_counter()
                v.run(batch)
                first = time.perf_counter() - t0
                for _ in range(warmup - 1 if first < SLOW_S else 0):
                    v.run(batch)
                (fast if first < SLOW_S else slow).append(v)
                v.wall[label], v.cpu[label] = [], []
            except Exception as e:  # noqa: BLE001
                traceback.print_exc(file=sys.stderr)
                v.timing_error[label] = short_error(e)
        log(f"  timing {label}: {len(fast)} variants x {repeats} interleaved rounds, {len(slow)} slow")
        for _ in range(repeats):
            for v in fast:
                c0, t0 = time.process_time(), time.perf_counter()
                v.run(batch)
                v.wall[label].append(time.perf_counter() - t0)
                v.cpu[label].append(time.process_time() - c0)
        for v in slow:
            for _ in range(min(2, repeats)):
                c0, t0 = time.process_time(), time.perf_counter()
                v.run(batch)
                v.wall[label].append(time.perf_counter() - t0)
                v.cpu[label].append(time.process_time() - c0)


def report(model: str, variants: list[Variant], fp32_size: int, labels: list[str]) -> None:
    ref = next(v for v in variants if v.tool == "torch" and v.method == "fp32")
    for label in labels:
        base = statistics.median(ref.wall[label]) if ref.wall.get(label) else None
        for v in variants:
            w = v.wall.get(label) or []
            med = statistics.median(w) if w else None
            emit({"model": model, "batch": label, "tool": v.tool, "method": v.method,
                  "latency_ms": round(med * 1e3, 2) if med else None,
                  "latency_min_ms": round(min(w) * 1e3, 2) if w else None,
                  "cpu_ms": round(statistics.median(v.cpu[label]) * 1e3, 1) if v.cpu.get(label) else None,
                  "repeats": len(w),
                  "speedup_vs_fp32_torch": round(base / med, 3) if med and base else None,
                  "size_bytes": v.size_bytes, "size_file": v.size_file,
                  "size_ratio": round(v.size_bytes / fp32_size, 4) if v.size_bytes else None,
                  **v.fidelity, "note": v.note or None,
                  "error": v.error or v.timing_error.get(label)})


def add(variants: list[Variant], tool: str, method: str, build: Callable[[Variant], None], note: str = "") -> None:
    """Build a variant (its runner, size, fidelity); a failure becomes a row with the error."""
    v = Variant(tool, method, note=note)
    log(f"  building {tool} / {method}")
    try:
        build(v)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc(file=sys.stderr)
        v.run, v.error = None, short_error(e)
    variants.append(v)


# --------------------------------------------------------------------------- shared builders

def transformer_fused(path: Path, out: Path, config: dict) -> Path:
    """ORT's BERT transformer fusions (Attention, SkipLayerNormalization, BiasGelu, EmbedLayerNorm)."""
    from secquant.runtime.onnx.session import _transformer_optimize

    proto, stats = _transformer_optimize(path.read_bytes(), config)
    if proto is None:
        raise RuntimeError(str(stats))
    import onnx

    onnx.save(proto, str(out))
    return out


def ort_quantize_dynamic(src: Path, dst: Path, per_channel: bool) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QInt8, per_channel=per_channel)
    return dst


def secquant_variant(v: Variant, handle, recipe, out: Path, fidelity: Callable, kind: str) -> None:
    t0 = time.perf_counter()
    qm = secquant.quantize(handle, recipe, out=out, overwrite=True)
    qt = time.perf_counter() - t0
    export_onnx(out)
    sess = Session(out, threads=THREADS)
    v.run = sess.run
    v.size_bytes, v.size_file = (out / "model.onnx").stat().st_size, "model.onnx"
    st = (out / "model.safetensors").stat().st_size
    v.fidelity = fidelity(v.run)
    v.fidelity.update({f"torch_{k}": val for k, val in fidelity(torch_runner(qm.module, kind)).items()})
    emb = sorted({r["type"] for r in qm.layers()})
    v.note = (f"recipe {getattr(recipe, 'name', recipe)}; model.safetensors {st} B; quantize {qt:.0f} s; "
              f"layer types {', '.join(emb)}; torch_* = the PyTorch quantized model")


def rotated_w4():
    """w4a16 with the Hadamard rotation the W4/W3 GPTQ presets use: what the rotation costs at run time
    (GPTQ itself changes only the codes, not the graph, so it is left out to keep the run short)."""
    from secquant.recipes import Rotation

    return get_preset("w4a16").model_copy(update={"name": "w4a16-rotated", "rotation": Rotation(block=128)})


def quantize_sym_proposal():
    """The proposed preset: w8a8-dynamic with symmetric per-token activations (zero point 0)."""
    r = get_preset("w8a8-dynamic")
    acts = r.activations.model_copy(update={"symmetric": True})
    return r.model_copy(update={"name": "w8a8-dynamic-sym (proposal)", "activations": acts,
                                "description": "int8 per-channel weights, symmetric int8 per-token dynamic "
                                               "activations (zero point 0)"})


# --------------------------------------------------------------------------- MiniLM

def bench_minilm(tmp: Path, repeats: int) -> None:
    log("builtin:minilm")
    handle = load_model("builtin:minilm")
    fmod = handle.module.eval()
    tok = handle.adapter.tokenizer
    sents = builtin_sentences()[0]
    evb = [handle.adapter.encode(sents[i:i + 32]) for i in range(0, len(sents), 32)]
    with torch.inference_mode():
        ref = torch.cat([fmod(**b) for b in evb]).float()

    def fidelity(run) -> dict:
        got = torch.cat([run(b) for b in evb]).float()
        cos = nn.functional.cosine_similarity(got, ref, dim=-1)
        return {"mean_cosine": round(float(cos.mean()), 6), "min_cosine": round(float(cos.min()), 6)}

    def padded(n: int) -> dict:
        return dict(tok(sents[:n], padding="max_length", truncation=True, max_length=SEQ, return_tensors="pt"))

    batches = {"32x128": padded(32), "1x128": padded(1)}
    fp32_size = float_size_bytes(fmod)
    cfg = json.loads((Path(handle.adapter.model_dir) / "config.json").read_text())
    V: list[Variant] = []

    def fp32_torch(v):
        v.run, v.size_bytes, v.size_file = torch_runner(fmod, "encoder"), fp32_size, "fp32 safetensors"
        v.fidelity = fidelity(v.run)
    add(V, "torch", "fp32", fp32_torch)

    fp32_onnx = tmp / "minilm-fp32.onnx"
    export_float_onnx(fmod, handle.adapter, handle.adapter.encode(sents[:2]), fp32_onnx)

    def ort_file(path_fn, note=""):
        def build(v):
            p = path_fn()
            v.run = ort_runner(ort_session(p), "encoder")
            v.size_bytes, v.size_file = p.stat().st_size, p.name
            v.fidelity = fidelity(v.run)
        return build

    fused = tmp / "minilm-fp32-fused.onnx"
    add(V, "onnxruntime", "fp32", ort_file(lambda: fp32_onnx))
    add(V, "onnxruntime", "fp32 + transformer fusions", ort_file(lambda: transformer_fused(fp32_onnx, fused, cfg)))
    for pc in (False, True):
        g = "per channel" if pc else "per tensor"
        add(V, "onnxruntime", f"quantize_dynamic int8 ({g})",
            ort_file(lambda pc=pc: ort_quantize_dynamic(fp32_onnx, tmp / f"minilm-qd-{int(pc)}.onnx", pc)),
            note="onnxruntime.quantization.quantize_dynamic(weight_type=QInt8) on the plain fp32 graph")
        add(V, "onnxruntime", f"quantize_dynamic int8 ({g}) + transformer fusions",
            ort_file(lambda pc=pc: ort_quantize_dynamic(fused if fused.is_file() else
                                                          transformer_fused(fp32_onnx, fused, cfg),
                                                          tmp / f"minilm-qdf-{int(pc)}.onnx", pc)),
            note="ORT's deployment path: transformer fusions (Attention, SkipLayerNorm, BiasGelu) on fp32, "
                 "then quantize_dynamic (QAttention, DynamicQuantizeMatMul)")

    def torch_ao(v):
        m = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fmod), {nn.Linear}, dtype=torch.qint8)
        v.run, v.size_bytes, v.size_file = torch_runner(m, "encoder"), torch_save_size(m), "torch.save"
        v.fidelity = fidelity(v.run)
    add(V, "torch.ao", "quantize_dynamic int8 (Linear)", torch_ao)

    def torchao_int8(v):
        import torchao
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            quantize_,
        )

        m = copy.deepcopy(fmod)
        quantize_(m.transformer, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        v.run, v.size_file = torch_runner(m, "encoder"), "torch.save"
        try:
            v.size_bytes = torch_save_size(m)
        except Exception as e:  # noqa: BLE001
            v.note = f"torch.save failed ({short_error(e)}); "
        v.note += f"torchao {torchao.__version__}, eager (no torch.compile), nn.Linear of .transformer"
        v.fidelity = fidelity(v.run)
    add(V, "torchao", "int8 dynamic act + int8 weight", torchao_int8)

    for name, recipe in [("w8a8-dynamic", "w8a8-dynamic"), ("w8a8", "w8a8"), ("w4a16", "w4a16"),
                         ("w4a16 + rotation", rotated_w4()), ("w8a8-dynamic-sym", quantize_sym_proposal())]:
        add(V, "secquant", name, lambda v, r=recipe, n=name: secquant_variant(
            v, handle, r, tmp / f"minilm-{n.replace(' + ', '-')}", fidelity, "encoder"))

    log("timing minilm")
    time_group(V, batches, repeats)
    report("builtin:minilm", V, fp32_size, list(batches))


# --------------------------------------------------------------------------- digits

def bench_digits(tmp: Path, repeats: int) -> None:
    log("builtin:digits")
    handle = load_model("builtin:digits")
    fmod = handle.module.eval()
    from secquant.models.digits import splits

    sp = splits()
    tx, ty = sp["test_x"], sp["test_y"]
    with torch.inference_mode():
        ref = fmod(tx).argmax(1)

    def fidelity(run) -> dict:
        pred = torch.cat([run(tx[i:i + DIGITS_BATCH]) for i in range(0, len(tx), DIGITS_BATCH)]).argmax(1)
        return {"accuracy": round(float((pred == ty).float().mean()), 5),
                "agreement": round(float((pred == ref).float().mean()), 5)}

    batches = {f"{DIGITS_BATCH}": tx[:DIGITS_BATCH].contiguous()}
    fp32_size = float_size_bytes(fmod)
    V: list[Variant] = []

    def fp32_torch(v):
        v.run, v.size_bytes, v.size_file = torch_runner(fmod, "classifier"), fp32_size, "fp32 safetensors"
        v.fidelity = fidelity(v.run)
    add(V, "torch", "fp32", fp32_torch)
    fp32_onnx = tmp / "digits-fp32.onnx"
    export_float_onnx(fmod, handle.adapter, tx[:2], fp32_onnx)

    def ort_file(path_fn):
        def build(v):
            p = path_fn()
            v.run = ort_runner(ort_session(p), "classifier")
            v.size_bytes, v.size_file = p.stat().st_size, p.name
            v.fidelity = fidelity(v.run)
        return build

    add(V, "onnxruntime", "fp32", ort_file(lambda: fp32_onnx))
    for pc in (False, True):
        add(V, "onnxruntime", f"quantize_dynamic int8 ({'per channel' if pc else 'per tensor'})",
            ort_file(lambda pc=pc: ort_quantize_dynamic(fp32_onnx, tmp / f"digits-qd-{int(pc)}.onnx", pc)))

    def torch_ao(v):
        m = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fmod), {nn.Linear}, dtype=torch.qint8)
        v.run, v.size_bytes, v.size_file = torch_runner(m, "classifier"), torch_save_size(m), "torch.save"
        v.fidelity = fidelity(v.run)
    add(V, "torch.ao", "quantize_dynamic int8 (Linear)", torch_ao,
        note="torch.ao dynamic quantization covers nn.Linear only: convolutions stay fp32")

    def torchao_int8(v):
        import torchao
        from torchao.quantization import (
            Int8DynamicActivationInt8WeightConfig,
            quantize_,
        )

        m = copy.deepcopy(fmod)
        quantize_(m, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
        v.run, v.size_file = torch_runner(m, "classifier"), "torch.save"
        try:
            v.size_bytes = torch_save_size(m)
        except Exception as e:  # noqa: BLE001
            v.note = f"torch.save failed ({short_error(e)}); "
        v.note += f"torchao {torchao.__version__}, eager; nn.Linear only (convolutions stay fp32)"
        v.fidelity = fidelity(v.run)
    add(V, "torchao", "int8 dynamic act + int8 weight", torchao_int8)

    for name in ("w8a8-dynamic", "w8a8", "w4a16"):
        add(V, "secquant", name, lambda v, n=name: secquant_variant(v, handle, n, tmp / f"digits-{n}", fidelity,
                                                                    "classifier"))
    log("timing digits")
    time_group(V, batches, repeats)
    report("builtin:digits", V, fp32_size, list(batches))


# --------------------------------------------------------------------------- bars and markdown

def rows(model: str, batch: str, tool: str | None = None) -> list[dict]:
    return [r for r in ROWS if r["model"] == model and r["batch"] == batch and (tool is None or r["tool"] == tool)]


def bars() -> list[tuple[str, str, str, bool | None]]:
    out = []
    m = rows("builtin:minilm", "32x128")
    fp = next((r for r in m if r["tool"] == "torch" and r["method"] == "fp32"), None)
    qds = [r for r in m if r["method"].startswith("quantize_dynamic") and r["tool"] == "onnxruntime"
           and r["latency_ms"]]
    qd = min(qds, key=lambda r: r["latency_ms"]) if qds else None
    for r in [r for r in m if r["tool"] == "secquant" and not r["method"].startswith("w4a16")]:
        if not (r["latency_ms"] and fp and fp["latency_ms"] and qd):
            out.append((f"secquant {r['method']} MiniLM b32: speed + fidelity", "-", r["error"] or "missing", None))
            continue
        sp, rq, cos = fp["latency_ms"] / r["latency_ms"], r["latency_ms"] / qd["latency_ms"], r.get("mean_cosine")
        ok = sp >= 1.8 and rq <= 1.05 and cos is not None and cos >= 0.995
        out.append((f"secquant {r['method']} MiniLM batch 32x128",
                    ">= 1.8x fp32 PyTorch, <= 1.05x fastest quantize_dynamic, mean cosine >= 0.995",
                    f"{sp:.2f}x fp32 PyTorch ({r['latency_ms']:.0f} vs {fp['latency_ms']:.0f} ms); {rq:.3f}x "
                    f"'{qd['method']}' ({qd['latency_ms']:.0f} ms); mean cosine {cos}", ok))
    w4 = next((r for r in m if r["tool"] == "secquant" and r["method"] == "w4a16"), None)
    if w4 and w4.get("note"):
        st = int(re.search(r"model.safetensors (\d+) B", w4["note"]).group(1))
        fps = fp["size_bytes"] if fp else None
        ratio = st / fps if fps else None
        out.append(("w4a16 MiniLM artifact size", "<= 0.2x fp32 safetensors",
                    f"{ratio:.3f}x ({st / 1e6:.2f} MB of {fps / 1e6:.2f} MB; model.onnx {w4['size_bytes'] / 1e6:.2f} "
                    "MB); the embedding tables are quantized too (4-bit, GatherBlockQuantized in ONNX)", ratio <= 0.2))
    else:
        out.append(("w4a16 MiniLM artifact size", "<= 0.2x fp32 safetensors", (w4 or {}).get("error") or "missing",
                    None))
    return out


def machine() -> str:
    model = "unknown CPU"
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = m.group(1).strip() if m else model
    except OSError:
        pass
    import onnxruntime

    return (f"{os.cpu_count()} cores, {model} (per /proc/cpuinfo); Python {platform.python_version()}, torch "
            f"{torch.__version__}, onnxruntime {onnxruntime.__version__}; torch.set_num_threads({THREADS}), ORT "
            f"intra_op_num_threads={THREADS}, inter_op 1, sequential, ORT_ENABLE_ALL")


def other_load(total_s: float) -> str:
    busy, own = cpu_counters()
    other = (busy - CPU_START[0]) - (own - CPU_START[1])
    return (f"other processes used {max(other, 0.0):.0f} CPU-seconds during the {total_s:.0f} s run "
            f"(~{max(other, 0.0) / total_s:.2f} of the {os.cpu_count()} cores on average; this run itself used "
            f"{own - CPU_START[1]:.0f} CPU-seconds); 1-minute load average at start / end {LOAD_START[0]:.2f} / "
            f"{os.getloadavg()[0]:.2f}")


HEAD = ["model", "batch", "tool", "method", "median ms", "min ms", "cpu ms", "n", "speedup vs fp32 torch",
        "size MB (file)", "size / fp32", "fidelity", "PyTorch-model fidelity"]


def fmt_fid(r: dict, prefix: str = "") -> str:
    keys = ["mean_cosine", "min_cosine", "accuracy", "agreement"]
    return ", ".join(f"{k} {r[prefix + k]}" for k in keys if r.get(prefix + k) is not None)


def markdown(total_s: float, repeats: int) -> str:
    try:
        date = subprocess.run(["date", "-u"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        date = time.strftime("%a %b %d %H:%M:%S UTC %Y", time.gmtime())
    esc = lambda s: str(s).replace("|", "\\|")
    L = ["## Speed", "",
         f"- Command: `{COMMAND} --repeats {repeats}` (from the repository root)",
         f"- Date: {date}",
         f"- Machine: {machine()}",
         f"- Total runtime: {total_s:.0f} s",
         f"- Contention: {other_load(total_s)}. Wall latencies are inflated by other processes' load; variants of "
         "one model and batch were timed in interleaved rounds so the load hits them alike, so compare ratios. "
         "`cpu ms` is this process's CPU time per run (less sensitive to waiting, but includes thread spinning).",
         "", "### Bars", "", "| bar | threshold | measured | result |", "|---|---|---|---|"]
    for name, thr, meas, ok in bars():
        L.append(f"| {esc(name)} | {esc(thr)} | {esc(meas)} | {'PASS' if ok else ('FAIL' if ok is False else 'ERROR')} |")
    L += ["", "### Results", "", "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for r in ROWS:
        f = lambda k, spec, r=r: "" if r.get(k) is None else format(r[k], spec)
        size = f"{r['size_bytes'] / 1e6:.2f} ({r['size_file']})" if r.get("size_bytes") else ""
        L.append("| " + " | ".join(esc(c) for c in [
            r["model"].replace("builtin:", ""), r["batch"], r["tool"], r["method"],
            f("latency_ms", ".1f") or f"ERROR: {r.get('error')}", f("latency_min_ms", ".1f"), f("cpu_ms", ".0f"),
            r["repeats"], f("speedup_vs_fp32_torch", ".2f"), size, f("size_ratio", ".3f"), fmt_fid(r),
            fmt_fid(r, "torch_")]) + " |")
    L += ["", "### Notes", "",
          "- Latency: median wall time of one forward pass (inputs already tokenized / tensors built), after 2 "
          "warmup runs; `n` timed repeats in interleaved rounds (digits: 3x the MiniLM repeats). Variants slower than 3 s per call are timed on "
          "their own with 2 repeats.",
          "- MiniLM inputs: the first 32 (or 1) built-in evaluation sentences padded to 128 tokens (attention mask "
          "marks the padding). Fidelity: mean / min cosine of the 256 evaluation sentences' embeddings to fp32 "
          "PyTorch. Digits: accuracy on the held-out split and top-1 agreement with fp32.",
          "- secquant rows: `secquant.quantize(handle, preset, out=dir)`, `secquant.runtime.export_onnx(dir)`, "
          "`secquant.runtime.Session(dir, threads=2)`; size is model.onnx (model.safetensors in the note; the "
          "artifact quantizes the embedding tables too). `PyTorch-model fidelity` is the secquant quantized "
          "PyTorch model's own fidelity, the ONNX graph reproduces it.",
          "- `w8a8-dynamic-sym (proposal)`: the w8a8-dynamic preset with `activations.symmetric=True` (int8 "
          "per-token activations with zero point 0: ONNX Runtime's plain U8S8 GEMM with a scalar zero point, no "
          "extra zero-point rows), evaluated as a possible preset change; not a shipped preset.",
          "- quantize_dynamic bar reference: the fastest quantize_dynamic row at batch 32 x 128.",
          "", "Per-row notes and errors:", ""]
    seen = set()
    for r in ROWS:
        key = (r["model"], r["tool"], r["method"])
        text = "; ".join(p for p in [r.get("note") or "", f"error: `{r['error']}`" if r.get("error") else ""] if p)
        if text and key not in seen:
            seen.add(key)
            L.append(f"- {r['model'].replace('builtin:', '')} / {r['tool']} / {r['method']}: {esc(text)}")
    return "\n".join(L) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9,
                    help="timed repeats per variant and batch (default 9; digits: 3x as many)")
    ap.add_argument("--only", choices=["minilm", "digits"], help="one model only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="secquant-speed-") as d:
        tmp = Path(d)
        if args.only in (None, "minilm"):
            bench_minilm(tmp, args.repeats)
        if args.only in (None, "digits"):
            bench_digits(tmp, 3 * args.repeats)  # milliseconds per call: more repeats are cheap
    total = time.perf_counter() - T_START
    for name, thr, meas, ok in bars():
        log(f"BAR {'PASS' if ok else ('FAIL' if ok is False else 'ERROR')}: {name}: {meas}")
    tmp_md = RESULTS_MD.with_suffix(".md.tmp")
    tmp_md.write_text(markdown(total, args.repeats))
    os.replace(tmp_md, RESULTS_MD)
    log(f"wrote {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
