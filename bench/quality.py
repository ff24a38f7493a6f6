#!/usr/bin/env python
"""Quality / size / latency benchmark: secquant presets vs. peer quantizers on CPU.

Run from the repository root:

    .venv/bin/python bench/quality.py

Prints one JSON line per result to stdout, then a summary table, and writes the
"## Quality" section of bench/RESULTS.md. Progress goes to stderr.

Models:
  * builtin:minilm -- mean cosine of each variant's sentence embeddings to the fp32
    embeddings over the 256 built-in evaluation sentences (batch 32), weight size, and
    median eager latency per batch of 32.
  * builtin:digits -- accuracy on the held-out split.

Peers (torch.ao, torchao, optimum-quanto) are applied to a deepcopy of the float
SentenceEncoder's `.transformer`, Linear layers only (as those tools do); secquant
presets also quantize the embedding tables. Every peer is wrapped in try/except and a
failure is recorded with its error string instead of a number.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)

import torch  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(2)

from machine import cpu_counters, machine_line, replace_section, source_fingerprint  # noqa: E402  (bench/machine.py)
from machine import other_load as _other_load  # noqa: E402
import secquant  # noqa: E402
from secquant.fidelity import float_size_bytes  # noqa: E402
from secquant.models import load_model  # noqa: E402
from secquant.models.encoder import builtin_sentences  # noqa: E402

T_START = time.perf_counter()
LOAD_START = os.getloadavg()
CPU_START = cpu_counters()
BATCH = 32
HERE = Path(__file__).resolve().parent
RESULTS_MD = HERE / "RESULTS.md"
COMMAND = ".venv/bin/python bench/quality.py"
PRESETS = ["w8a16", "w8a8-dynamic", "w8a8", "w4a16", "w4a8-dynamic"]
PRESET_BITS = {"fp32": "fp32", **{p: p.replace("-dynamic", "") for p in PRESETS}}
QUANTIZE_TIME_BAR_S = 20.0

ROWS: list[dict] = []
KEYS = ["model", "variant", "tool", "bits", "metric", "value", "float_value", "size_bytes", "size_ratio",
        "latency_ms", "float_latency_ms", "n_samples", "n_latency_batches", "quant_time_s", "scope",
        "size_format", "note", "error"]


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T_START:7.1f}s] {msg}", file=sys.stderr, flush=True)


def emit(**row) -> dict:
    full = {k: row.pop(k, None) for k in KEYS}
    full.update(row)
    for k in ("value", "float_value", "size_ratio", "latency_ms", "float_latency_ms", "quant_time_s"):
        if isinstance(full[k], float):
            full[k] = round(full[k], 6 if k in ("value", "float_value") else 4)
    print(json.dumps(full), flush=True)
    ROWS.append(full)
    return full


def short_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]


def torch_save_size(module: nn.Module) -> int:
    buf = io.BytesIO()
    torch.save(module.state_dict(), buf)
    return buf.tell()


def quantized_layer_summary(qm) -> str:
    c = Counter(r["type"] for r in qm.layers())
    return ", ".join(f"{n} {t}" for t, n in sorted(c.items()))


# --------------------------------------------------------------------------- minilm

def run_encoder(handle, module: nn.Module, batches, n_batches: int | None = None):
    """(embeddings, per-batch ms) over the first n_batches eval batches, eager, no_grad."""
    outs, ms = [], []
    with torch.no_grad():
        for b in batches[:n_batches]:
            t0 = time.perf_counter()
            e = handle.run(module, b)
            ms.append((time.perf_counter() - t0) * 1e3)
            outs.append(e.float())
    return torch.cat(outs), ms


def mean_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a, b[: a.shape[0]], dim=-1).mean())


def bench_minilm(tmp: Path) -> None:
    log("loading builtin:minilm")
    handle = load_model("builtin:minilm")
    fmod = handle.module
    eval_sents, calib_sents = builtin_sentences()
    batches = [handle.adapter.encode(eval_sents[i:i + BATCH]) for i in range(0, len(eval_sents), BATCH)]
    n_sent = len(eval_sents)

    # fp32 reference (one warm-up batch first so the reference latency is not penalized by first-call costs).
    with torch.no_grad():
        handle.run(fmod, batches[0])
    ref, f_ms = run_encoder(handle, fmod, batches)
    f_lat = statistics.median(f_ms)
    f_size_st = float_size_bytes(fmod)  # fp32 safetensors (secquant's reference)
    f_size_pt = torch_save_size(fmod)  # fp32 torch.save of the state dict (peers' reference)
    emit(model="builtin:minilm", variant="fp32", tool="torch", bits="fp32", metric="mean_cosine_to_fp32",
         value=1.0, float_value=1.0, size_bytes=f_size_st, size_ratio=1.0, latency_ms=f_lat, float_latency_ms=f_lat,
         n_samples=n_sent, n_latency_batches=len(f_ms), scope="float", size_format="safetensors",
         note=f"fp32 state dict: {f_size_st} B as safetensors, {f_size_pt} B as torch.save; "
              f"max_length={handle.adapter.max_length}, padded seq lengths "
              f"{sorted({int(b['input_ids'].shape[1]) for b in batches})}",
         fp32_torch_save_bytes=f_size_pt)
    log(f"fp32 done: median {f_lat:.0f} ms/batch")

    # ---- secquant presets (quantize -> artifact -> load the artifact -> evaluate)
    for preset in PRESETS:
        out = tmp / f"minilm-{preset}"
        try:
            log(f"secquant quantize {preset}")
            t0 = time.perf_counter()
            qm = secquant.quantize(handle, preset, out=out)
            qt = time.perf_counter() - t0
            layers = quantized_layer_summary(qm)
            lq = secquant.load(out, allow_unsealed=True)
            emb, ms = run_encoder(handle, lq.module, batches)
            size = (out / "model.safetensors").stat().st_size
            cal = qm.manifest.calibration
            note = (f"recipe: {qm.manifest.recipe.description}; quantized layers: {layers} (incl. embedding "
                    f"tables); artifact reloaded with secquant.load")
            if cal.data != "none":
                note += f"; calibrated on {cal.num_samples} built-in calibration sentences"
            emit(model="builtin:minilm", variant=preset, tool="secquant", bits=PRESET_BITS[preset],
                 metric="mean_cosine_to_fp32", value=mean_cos(emb, ref), float_value=1.0, size_bytes=size,
                 size_ratio=size / f_size_st, latency_ms=statistics.median(ms), float_latency_ms=f_lat,
                 n_samples=emb.shape[0], n_latency_batches=len(ms), quant_time_s=qt,
                 scope="all Linear + Embedding", size_format="artifact model.safetensors", note=note)
            if preset == "w8a8":
                emit(model="builtin:minilm", variant="quantize-time w8a8", tool="secquant", bits="w8a8",
                     metric="quantize_seconds", value=qt, size_bytes=None, scope="all Linear + Embedding",
                     note=f"wall time of secquant.quantize(handle, 'w8a8', out=dir) with the float model already "
                          f"loaded ({cal.num_samples} calibration samples, batch {qm.manifest.recipe.calibration.batch_size}); "
                          f"includes writing the artifact; bar < {QUANTIZE_TIME_BAR_S:.0f} s",
                     bar=f"< {QUANTIZE_TIME_BAR_S:.0f} s", passed=qt < QUANTIZE_TIME_BAR_S)
            del qm, lq
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            emit(model="builtin:minilm", variant=preset, tool="secquant", bits=PRESET_BITS[preset],
                 metric="mean_cosine_to_fp32", error=short_error(e), note="secquant failed")
        log(f"secquant {preset} done")

    # ---- peers: Linear layers of a deepcopy of .transformer only
    peer_scope = "nn.Linear in .transformer only (embeddings stay fp32)"

    def peer(variant: str, tool: str, bits: str, fn, n_batches: int | None = None, note: str = "",
             scope: str = peer_scope) -> None:
        log(f"peer {tool} {variant}")
        try:
            enc = copy.deepcopy(fmod).eval()
            t0 = time.perf_counter()
            fn(enc)
            qt = time.perf_counter() - t0
            emb, ms = run_encoder(handle, enc, batches, n_batches)
            try:
                size = torch_save_size(enc)
                ratio = size / f_size_pt
                size_err = None
            except Exception as e:  # noqa: BLE001
                size, ratio, size_err = None, None, short_error(e)
            n_note = ""
            if n_batches is not None and n_batches < len(batches):
                n_note = (f"; cosine and latency on the first {emb.shape[0]} of {n_sent} sentences "
                          f"({len(ms)} batches) only, to bound run time")
            emit(model="builtin:minilm", variant=variant, tool=tool, bits=bits, metric="mean_cosine_to_fp32",
                 value=mean_cos(emb, ref), float_value=1.0, size_bytes=size, size_ratio=ratio,
                 latency_ms=statistics.median(ms), float_latency_ms=statistics.median(f_ms[:len(ms)]),
                 n_samples=emb.shape[0], n_latency_batches=len(ms), quant_time_s=qt, scope=scope,
                 size_format="torch.save(state_dict), ratio vs fp32 torch.save", note=(note + n_note).lstrip("; "),
                 **({"size_error": size_err} if size_err else {}))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            emit(model="builtin:minilm", variant=variant, tool=tool, bits=bits, metric="mean_cosine_to_fp32",
                 scope=scope, error=short_error(e), note=(note + "; FAILED on this CPU").lstrip("; "))

    # torch.ao eager dynamic quantization (int8 per-tensor weights, dynamic per-tensor activations)
    def torch_ao_dynamic(enc):
        enc.transformer = torch.ao.quantization.quantize_dynamic(enc.transformer, {nn.Linear}, dtype=torch.qint8)

    peer("int8-dynamic", "torch.ao.quantize_dynamic", "w8a8",
         torch_ao_dynamic,
         note=f"qengine={torch.backends.quantized.engine}, default_dynamic_qconfig: per-tensor MinMax int8 weights, "
              "per-tensor dynamic uint8 activations (the dynamic Linear op runs with reduce_range=True, i.e. 7-bit "
              "activation range)")

    # torchao
    try:
        import torchao
        from torchao.quantization import (
            Int4WeightOnlyConfig, Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig,
            IntxWeightOnlyConfig, PerGroup, quantize_,
        )
        tao = f"torchao {torchao.__version__}"
        peer("int8-weight-only", tao, "w8a16",
             lambda enc: quantize_(enc.transformer, Int8WeightOnlyConfig(set_inductor_config=False)),
             note="Int8WeightOnlyConfig (per-row)")
        peer("int8-dyn-act-int8-weight", tao, "w8a8",
             lambda enc: quantize_(enc.transformer, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False)),
             note="Int8DynamicActivationInt8WeightConfig (per-row weights, per-token activations); "
                  "cosine and latency over all 256 sentences (8 batches), no reduction was needed")
        # The stable Int4WeightOnlyConfig: its default (plain, mslk kernels) has no CPU path.
        peer("int4-weight-only-g128", tao, "w4a16",
             lambda enc: quantize_(enc.transformer, Int4WeightOnlyConfig(group_size=128, set_inductor_config=False)),
             note="Int4WeightOnlyConfig(group_size=128), default int4_packing_format=plain")
        # The CPU-capable int4 layout in torchao 0.18: prototype Int4OpaqueTensor (tinygemm CPU kernel);
        # the kernel needs bf16 activations, so the transformer is cast to bf16 first (as torchao's CPU recipe does).
        from torchao.prototype.quantization.int4 import PrototypeInt4WeightOnlyConfig

        def tao_int4_cpu(enc):
            enc.transformer.to(torch.bfloat16)
            quantize_(enc.transformer, PrototypeInt4WeightOnlyConfig(group_size=128, set_inductor_config=False))

        peer("int4-weight-only-g128 (cpu opaque, bf16)", tao, "w4a16", tao_int4_cpu,
             note="prototype PrototypeInt4WeightOnlyConfig(group_size=128) -> Int4OpaqueTensor, CPU tinygemm kernel; "
                  "transformer cast to bf16 first (the kernel takes bf16 activations), so embeddings/LayerNorm are "
                  "bf16 too and the size includes bf16 embeddings",
             scope="nn.Linear in .transformer (int4); rest of .transformer cast to bf16")
        # Plain-PyTorch int4 g128 path that runs in fp32 on CPU (weights stored unpacked in int8 containers).
        peer("intx-int4-weight-only-g128", tao, "w4a16",
             lambda enc: quantize_(enc.transformer, IntxWeightOnlyConfig(weight_dtype=torch.int4,
                                                                         granularity=PerGroup(128))),
             note="IntxWeightOnlyConfig(int4, PerGroup(128)), symmetric; int4 values stored unpacked in int8 "
                  "(no 2-per-byte packing), so size is ~int8")
    except Exception as e:  # noqa: BLE001
        emit(model="builtin:minilm", variant="torchao", tool="torchao", error=short_error(e), note="import failed")

    # optimum-quanto
    try:
        import optimum.quanto as oq
        from importlib.metadata import version as _v
        qto = f"optimum-quanto {_v('optimum-quanto')}"

        def quanto_w(dt):
            def f(enc):
                oq.quantize(enc.transformer, weights=dt)
                oq.freeze(enc.transformer)
            return f

        peer("qint8-weights", qto, "w8a16", quanto_w(oq.qint8), note="quantize(weights=qint8) + freeze")

        def quanto_wa(enc):
            oq.quantize(enc.transformer, weights=oq.qint8, activations=oq.qint8)
            with torch.no_grad(), oq.Calibration():
                for i in range(0, len(calib_sents), BATCH):
                    handle.run(enc, handle.adapter.encode(calib_sents[i:i + BATCH]))
            oq.freeze(enc.transformer)

        peer("qint8-weights+activations", qto, "w8a8", quanto_wa,
             note=f"quantize(weights=qint8, activations=qint8), Calibration() over the same {len(calib_sents)} "
                  "built-in calibration sentences secquant uses, then freeze (quant_time_s includes calibration)")
        peer("qint4-weights", qto, "w4a16", quanto_w(oq.qint4),
             note="quantize(weights=qint4) + freeze (quanto's default group size 128)")
    except Exception as e:  # noqa: BLE001
        emit(model="builtin:minilm", variant="optimum-quanto", tool="optimum-quanto", error=short_error(e),
             note="import failed")


# --------------------------------------------------------------------------- digits

def run_digits(handle, module: nn.Module):
    correct = n = 0
    ms = []
    with torch.no_grad():  # warm-up batch (not timed)
        handle.run(module, next(iter(handle.adapter.eval_batches(None, BATCH)))[0])
    with torch.no_grad():
        for x, y in handle.adapter.eval_batches(None, BATCH):
            t0 = time.perf_counter()
            out = handle.run(module, x)
            ms.append((time.perf_counter() - t0) * 1e3)
            correct += int((out.argmax(-1) == y).sum())
            n += len(y)
    return correct / n, n, statistics.median(ms), len(ms)


def bench_digits(tmp: Path) -> None:
    log("builtin:digits")
    handle = load_model("builtin:digits")
    fmod = handle.module
    f_acc, n, f_lat, nb = run_digits(handle, fmod)
    f_size_st = float_size_bytes(fmod)
    f_size_pt = torch_save_size(fmod)
    emit(model="builtin:digits", variant="fp32", tool="torch", bits="fp32", metric="accuracy", value=f_acc,
         float_value=f_acc, size_bytes=f_size_st, size_ratio=1.0, latency_ms=f_lat, float_latency_ms=f_lat,
         n_samples=n, n_latency_batches=nb, scope="float", size_format="safetensors",
         note=f"held-out split; fp32 torch.save size {f_size_pt} B", fp32_torch_save_bytes=f_size_pt)
    for preset in ["w8a8", "w8a8-dynamic", "w8a16", "w4a16", "w4a8-dynamic"]:
        out = tmp / f"digits-{preset}"
        try:
            t0 = time.perf_counter()
            qm = secquant.quantize(handle, preset, out=out)
            qt = time.perf_counter() - t0
            lq = secquant.load(out, allow_unsealed=True)
            acc, n, lat, nb = run_digits(handle, lq.module)
            size = (out / "model.safetensors").stat().st_size
            note = f"quantized layers: {quantized_layer_summary(qm)}"
            if qm.manifest.calibration.data != "none":
                note += f"; calibrated on {qm.manifest.calibration.num_samples} training-split samples"
            emit(model="builtin:digits", variant=preset, tool="secquant", bits=PRESET_BITS[preset], metric="accuracy",
                 value=acc, float_value=f_acc, size_bytes=size, size_ratio=size / f_size_st, latency_ms=lat,
                 float_latency_ms=f_lat, n_samples=n, n_latency_batches=nb, quant_time_s=qt, scope="all Conv2d + Linear",
                 size_format="artifact model.safetensors", note=note)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc(file=sys.stderr)
            emit(model="builtin:digits", variant=preset, tool="secquant", bits=PRESET_BITS[preset],
                 metric="accuracy", error=short_error(e), note="secquant failed")
    try:
        t0 = time.perf_counter()
        q = torch.ao.quantization.quantize_dynamic(copy.deepcopy(fmod).eval(), {nn.Linear}, dtype=torch.qint8)
        qt = time.perf_counter() - t0
        acc, n, lat, nb = run_digits(handle, q)
        size = torch_save_size(q)
        emit(model="builtin:digits", variant="int8-dynamic", tool="torch.ao.quantize_dynamic", bits="w8a8",
             metric="accuracy", value=acc, float_value=f_acc, size_bytes=size, size_ratio=size / f_size_pt,
             latency_ms=lat, float_latency_ms=f_lat, n_samples=n, n_latency_batches=nb, quant_time_s=qt,
             scope="nn.Linear only (convs stay fp32)", size_format="torch.save(state_dict), ratio vs fp32 torch.save",
             note=f"qengine={torch.backends.quantized.engine}")
    except Exception as e:  # noqa: BLE001
        emit(model="builtin:digits", variant="int8-dynamic", tool="torch.ao.quantize_dynamic", bits="w8a8",
             metric="accuracy", error=short_error(e), note="FAILED")
    log("digits done")


# --------------------------------------------------------------------------- report

def find(model: str, variant: str, tool: str = "secquant") -> dict | None:
    for r in ROWS:
        if r["model"] == model and r["variant"] == variant and r["tool"] == tool:
            return r
    return None


def bars() -> list[tuple[str, str, str, bool | None]]:
    """(bar, threshold, measured, passed)."""
    out = []

    def cos_bar(preset: str, thr: float):
        r = find("builtin:minilm", preset)
        v = r["value"] if r else None
        out.append((f"minilm {preset} mean cosine", f">= {thr}", "error" if v is None else f"{v:.4f}",
                    None if v is None else v >= thr))

    cos_bar("w8a16", 0.999)
    cos_bar("w8a8-dynamic", 0.995)
    cos_bar("w4a16", 0.96)
    r = find("builtin:digits", "w8a8")
    if r and r["value"] is not None:
        d = (r["float_value"] - r["value"]) * 100
        out.append(("digits w8a8 (static) accuracy vs fp32", "within 0.5 points",
                    f"{r['value'] * 100:.2f}% vs {r['float_value'] * 100:.2f}% ({-d:+.2f} pts)", abs(d) <= 0.5))
    else:
        out.append(("digits w8a8 (static) accuracy vs fp32", "within 0.5 points", "error", None))
    r = find("builtin:minilm", "quantize-time w8a8")
    v = r["value"] if r else None
    out.append(("secquant.quantize(minilm, 'w8a8') time", f"< {QUANTIZE_TIME_BAR_S:.0f} s",
                "error" if v is None else f"{v:.1f} s", None if v is None else v < QUANTIZE_TIME_BAR_S))
    return out


def fmt(v, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table_rows() -> list[list[str]]:
    rows = []
    for r in ROWS:
        if r["metric"] == "quantize_seconds":
            continue
        if r["error"]:
            val = "FAILED: " + r["error"]
        elif r["metric"] == "accuracy":
            val = f"{r['value'] * 100:.2f}%"
        else:
            val = f"{r['value']:.4f}"
            if r["n_samples"] and r["model"] == "builtin:minilm" and r["n_samples"] < 256:
                val += f" (n={r['n_samples']})"
        size = "" if r["size_bytes"] is None else f"{r['size_bytes'] / 1e6:.2f} MB"
        rows.append([r["model"].replace("builtin:", ""), r["tool"], r["variant"], r["bits"] or "",
                     r["metric"].replace("mean_cosine_to_fp32", "mean cos"), val, size, fmt(r["size_ratio"], ".3f"),
                     fmt(r["latency_ms"], ".2f" if (r["latency_ms"] or 0) < 10 else ".0f"), fmt(r["quant_time_s"], ".1f"), r["scope"] or ""])
    return rows


HEAD = ["model", "tool", "variant", "bits", "metric", "value", "size", "size ratio", "latency ms/batch32",
        "quantize s", "scope"]


def print_summary(total_s: float) -> None:
    rows = table_rows()
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(HEAD)]
    widths = [min(w, 60) for w in widths]
    line = lambda cells: "  ".join(str(c)[:w].ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    print()
    print(line(HEAD))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    print()
    for name, thr, meas, ok in bars():
        print(f"BAR {'PASS' if ok else ('FAIL' if ok is False else 'ERROR')}: {name} {thr}: measured {meas}")
    print(f"source: {SOURCE_AT_START}")
    print(f"total runtime: {total_s:.0f} s; {other_load(total_s)}; 1-min load average start/end: "
          f"{LOAD_START[0]:.2f} / {os.getloadavg()[0]:.2f}")


SOURCE_AT_START = source_fingerprint()


def machine() -> str:
    return machine_line(2)


def other_load(total_s: float) -> str:
    return _other_load(CPU_START, total_s)


def markdown(total_s: float) -> str:
    try:
        date = subprocess.run(["date"], capture_output=True, text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        date = time.strftime("%a %b %d %H:%M:%S %Z %Y")
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    L = ["## Quality", "",
         f"- Command: `{COMMAND}` (from the repository root)",
         f"- Date: {date}",
         f"- Machine: {machine()}",
         f"- Source: {SOURCE_AT_START}"
         + ("" if source_fingerprint() == SOURCE_AT_START else " -- WARNING: the sources changed during the run"),
         f"- Total runtime of the run that produced these numbers: {total_s:.0f} s",
         f"- Contention: {other_load(total_s)}; 1-minute load average at start / end "
         f"{LOAD_START[0]:.2f} / {os.getloadavg()[0]:.2f}. Anything other than ~0 other-process CPU means "
         "latency and quantize-time numbers are inflated by sharing the 2 cores; cosine/accuracy/size are unaffected.",
         "", "### Bars", "", "| bar | threshold | measured | result |", "|---|---|---|---|"]
    for name, thr, meas, ok in bars():
        L.append(f"| {esc(name)} | {esc(thr)} | {esc(meas)} | {'PASS' if ok else ('FAIL' if ok is False else 'ERROR')} |")
    L += ["", "### Results", "",
          "| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    for r in table_rows():
        L.append("| " + " | ".join(esc(c) for c in r) + " |")
    fp = find("builtin:minilm", "fp32", "torch")
    L += ["", "### Notes", "",
          "- minilm: mean cosine of each variant's L2-normalized mean-pooled embedding to the fp32 embedding, "
          "over the 256 built-in evaluation sentences (batch 32, max length as the adapter sets). Latency is the "
          "median eager wall time per batch of 32 (torch.no_grad, 2 threads) over the same pass.",
          "- secquant sizes are the artifact's `model.safetensors`, ratio against the fp32 state dict as safetensors; "
          "peer sizes are `torch.save(state_dict)` of the whole SentenceEncoder, ratio against fp32 `torch.save`"
          + (f" ({fp['fp32_torch_save_bytes'] / 1e6:.2f} MB vs {fp['size_bytes'] / 1e6:.2f} MB safetensors)." if fp else "."),
          "- Scope differs: peers were applied to a deepcopy of the float SentenceEncoder's `.transformer`, "
          "nn.Linear layers only (as those tools do), so the 30522x384 word-embedding table (~47 MB of ~91 MB fp32) "
          "stays fp32 and their size ratio cannot go much below ~0.65. secquant presets also quantize the "
          "embedding tables (Embedding rows in the notes below), which is where most of their size reduction comes from.",
          "- secquant runs eager PyTorch with the integer math simulated in float (no int kernels; see the runtime "
          "string of secquant.evaluate), so its latency stays near or above fp32; peers with real int kernels "
          "(torch.ao dynamic, torchao int8-dynamic, torchao int4 CPU) can be faster.",
          "- Latencies come from a single pass; on a 2-core VM expect roughly +-10% run-to-run noise.",
          "", "Per-row notes and failures:", ""]
    for r in ROWS:
        bits = [r["note"] or ""]
        if r["error"]:
            bits.append(f"error: `{r['error']}`")
        text = "; ".join(b for b in bits if b)
        if text:
            L.append(f"- {r['model'].replace('builtin:', '')} / {r['tool']} / {r['variant']}: {esc(text)}")
    return "\n".join(L) + "\n"


def write_results_md(total_s: float) -> None:
    replace_section(RESULTS_MD, "Quality", markdown(total_s))
    log(f"wrote {RESULTS_MD}")


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="secquant-bench-") as d:
        tmp = Path(d)
        bench_digits(tmp)
        bench_minilm(tmp)
    total = time.perf_counter() - T_START
    print_summary(total)
    write_results_md(total)
    return 0


if __name__ == "__main__":
    sys.exit(main())
