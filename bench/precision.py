"""Low-bit precision benchmark: secquant's RTN / AWQ-style / GPTQ / data-free range search /
NF4 / k-means / power-of-two at W4, W3, W2 on MiniLM against the PyPI `hqq` package, plus
PTQ vs QAT and accuracy-driven tuning on digits. One run; prints a JSON line per result and
writes the "## Precision" section of bench/RESULTS.md.

    .venv/bin/python bench/precision.py
"""

from __future__ import annotations

import copy
import datetime as dt
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import torch

import secquant
from secquant.models import load_model
from secquant.models.encoder import builtin_sentences
from secquant.recipes import Calibration, QuantArgs, Recipe, get_preset

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "RESULTS.md"
torch.set_num_threads(2)
rows: list[dict] = []


def emit(**r) -> None:
    rows.append(r)
    print(json.dumps(r), flush=True)


@torch.no_grad()
def embed(handle, module) -> torch.Tensor:
    texts = builtin_sentences()[0]
    return torch.cat([handle.run(module, handle.adapter.encode(texts[i:i + 32])) for i in range(0, len(texts), 32)])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def minilm() -> None:
    h = load_model("builtin:minilm")
    ref = embed(h, h.module)
    fsize = secquant.api.source_entry(h.module).float_size_bytes
    w2rtn = Recipe(name="w2a16-rtn", weights=QuantArgs(bits=2, symmetric=False, granularity="group", group_size=64))
    variants = [
        ("W4 g128", "RTN (w4a16-rtn, MSE clip)", get_preset("w4a16-rtn"), "all"),
        ("W4 g128", "AWQ-style (w4a16)", get_preset("w4a16"), "all"),
        ("W4 g128", "GPTQ (w4a16-gptq)", get_preset("w4a16-gptq"), "all"),
        ("W4 g128", "GPTQ (w4a16-gptq)", get_preset("w4a16-gptq"), "linear"),
        ("W4 g64", "NF4 (nf4)", get_preset("nf4"), "all"),
        ("W4 per-channel LUT", "k-means (kmeans4)", get_preset("kmeans4"), "all"),
        ("W4 per-channel", "power-of-two (pow2-4)", get_preset("pow2-4"), "all"),
        ("W3 g128", "RTN (w3a16)", get_preset("w3a16"), "all"),
        ("W3 g128", "RTN (w3a16)", get_preset("w3a16"), "linear"),
        ("W3 g128", "MSE range search (w3a16-hqq)", get_preset("w3a16-hqq"), "all"),
        ("W3 g128", "GPTQ (w3a16-gptq)", get_preset("w3a16-gptq"), "all"),
        ("W3 g128", "GPTQ (w3a16-gptq)", get_preset("w3a16-gptq"), "linear"),
        ("W2 g64", "RTN", w2rtn, "all"),
        ("W2 g64", "GPTQ (w2a16-gptq)", get_preset("w2a16-gptq"), "all"),
        ("W2 g64", "GPTQ (w2a16-gptq)", get_preset("w2a16-gptq"), "linear"),
    ]
    with tempfile.TemporaryDirectory() as td:
        for i, (bits, method, recipe, scope) in enumerate(variants):
            if scope == "linear":
                recipe = recipe.model_copy(update={"targets": ["Linear"]})
            t0 = time.perf_counter()
            secquant.quantize(h, recipe, out=Path(td) / str(i))
            qt = time.perf_counter() - t0
            qm = secquant.load(Path(td) / str(i))
            size = (Path(td) / str(i) / "model.safetensors").stat().st_size
            emit(model="minilm", tool="secquant", bits=bits, method=method, scope=scope,
                 cosine=round(cosine(embed(h, qm.module), ref), 5), size_bytes=size,
                 size_ratio=round(size / fsize, 4), quantize_s=round(qt, 1))
    # the PyPI hqq package (data-free half-quadratic optimization), Linear layers only
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear

        for nbits, g in [(4, 128), (3, 128), (2, 64)]:
            m = copy.deepcopy(h.module)
            t0 = time.perf_counter()
            for name, mod in list(m.named_modules()):
                if isinstance(mod, torch.nn.Linear):
                    hq = HQQLinear(mod, BaseQuantizeConfig(nbits=nbits, group_size=g), compute_dtype=torch.float32,
                                   device="cpu", del_orig=False)
                    mod.weight.data = hq.dequantize().float().reshape(mod.weight.shape)
            qt = time.perf_counter() - t0
            emit(model="minilm", tool="hqq " + __import__("hqq").__version__, bits=f"W{nbits} g{g}",
                 method="HQQ (package defaults)", scope="linear", cosine=round(cosine(embed(h, m), ref), 5),
                 size_bytes=None, size_ratio=None, quantize_s=round(qt, 1))
    except Exception as e:  # record, never hide
        emit(model="minilm", tool="hqq", bits="-", method="HQQ", scope="linear", cosine=None,
             note=f"FAILED: {type(e).__name__}: {e}")
    # GPTQ time bar: W4 with 128 calibration sentences
    r = get_preset("w4a16-gptq").model_copy(update={"calibration": Calibration(num_samples=128)})
    t0 = time.perf_counter()
    qm = secquant.quantize(h, r)
    emit(model="minilm", tool="secquant", bits="W4 g128", method="GPTQ, 128 calibration sentences (time bar)",
         scope="all", cosine=round(cosine(embed(h, qm.module), ref), 5), quantize_s=round(time.perf_counter() - t0, 1))


def digits() -> None:
    h = load_model("builtin:digits")
    d = h.adapter.builtin

    def acc(m) -> float:
        with torch.no_grad():
            return round(float((m(d["test_x"]).argmax(1) == d["test_y"]).float().mean()) * 100, 2)

    fp32 = acc(h.module)
    emit(model="digits", tool="torch", method="fp32", accuracy=fp32)
    for preset in ("w4a4", "w2a8"):
        ptq = secquant.quantize(h, preset)
        t0 = time.perf_counter()
        q = secquant.qat(h, preset, epochs=15)
        emit(model="digits", tool="secquant", method=f"{preset} PTQ", accuracy=acc(ptq.module))
        emit(model="digits", tool="secquant", method=f"{preset} QAT (LSQ, 15 epochs)", accuracy=acc(q.module),
             train_s=round(time.perf_counter() - t0, 1))
    with tempfile.TemporaryDirectory() as td:
        secquant.quantize(h, "w8a8", out=Path(td) / "w8a8")
        w8 = (Path(td) / "w8a8" / "model.safetensors").stat().st_size
        res = secquant.tune(h, max_drop=1.0, out=Path(td) / "tuned", log=None)
        emit(model="digits", tool="secquant", method="tune --max-drop 1", accuracy=round(res.summary["value"], 2),
             size_bytes=res.summary["size_bytes"], w8a8_size_bytes=w8, goal_met=res.goal_met,
             bits_per_layer=res.summary["bits_per_layer"])


def _find(method_prefix: str, bits: str, scope: str) -> dict | None:
    return next((r for r in rows if r.get("bits") == bits and r.get("method", "").startswith(method_prefix)
                 and r.get("scope") == scope and r.get("tool") == "secquant"), None)


def write_results(seconds: float) -> None:
    def cos(r):
        return r["cosine"] if r else float("nan")

    g4 = _find("GPTQ (w4a16-gptq)", "W4 g128", "all")
    g4l = _find("GPTQ (w4a16-gptq)", "W4 g128", "linear")
    g3l, r3l = _find("GPTQ (w3a16-gptq)", "W3 g128", "linear"), _find("RTN (w3a16)", "W3 g128", "linear")
    g3, r3 = _find("GPTQ (w3a16-gptq)", "W3 g128", "all"), _find("RTN (w3a16)", "W3 g128", "all")
    hqq3 = next((r for r in rows if r.get("tool", "").startswith("hqq") and r.get("bits") == "W3 g128"), None)
    gt = next((r for r in rows if "time bar" in r.get("method", "")), None)
    tune = next((r for r in rows if r.get("method") == "tune --max-drop 1"), None)
    fp32 = next(r["accuracy"] for r in rows if r.get("method") == "fp32")
    qat = {p: next(r["accuracy"] for r in rows if r.get("method", "").startswith(f"{p} QAT")) for p in ("w4a4", "w2a8")}
    ok = lambda c: "PASS" if c else "FAIL"  # noqa: E731
    bars = [
        ("GPTQ W4 g128 mean cosine >= 0.99", f"{cos(g4):.4f} (embeddings 4-bit too); {cos(g4l):.4f} Linear only",
         ok(cos(g4l) >= 0.99)),
        ("GPTQ W3 g128 >= RTN W3 + 0.02", f"{cos(g3):.4f} vs {cos(r3):.4f} (all); {cos(g3l):.4f} vs {cos(r3l):.4f} (Linear)",
         ok(cos(g3l) >= cos(r3l) + 0.02 and cos(g3) >= cos(r3) + 0.02)),
        ("GPTQ W3 g128 not below hqq W3 g128 (Linear only, like for like)",
         f"{cos(g3l):.4f} vs {cos(hqq3):.4f}", ok(hqq3 is not None and cos(g3l) >= cos(hqq3))),
        ("GPTQ W4, 128 calibration sentences, < 120 s", f"{gt['quantize_s']} s" if gt else "n/a",
         ok(gt is not None and gt["quantize_s"] < 120)),
        ("tune --max-drop 1 on digits smaller than uniform w8a8",
         f"{tune['size_bytes']} B vs {tune['w8a8_size_bytes']} B, drop {fp32 - tune['accuracy']:.2f} pts",
         ok(tune["size_bytes"] < tune["w8a8_size_bytes"] and tune["goal_met"])),
        ("QAT W4A4 within 1 point of fp32", f"{qat['w4a4']:.2f}% vs {fp32:.2f}%", ok(qat["w4a4"] >= fp32 - 1)),
        ("QAT W2A8 within 1 point of fp32", f"{qat['w2a8']:.2f}% vs {fp32:.2f}%", ok(qat["w2a8"] >= fp32 - 1)),
    ]
    lines = ["## Precision", "",
             "- Command: `.venv/bin/python bench/precision.py` (from the repository root)",
             f"- Date: {dt.datetime.now(dt.timezone.utc):%Y-%m-%d %H:%M} UTC; 2 cores (AMD EPYC), torch.set_num_threads(2); "
             f"total runtime {seconds:.0f} s; 1-min load average at the end {os.getloadavg()[0]:.2f}",
             "- MiniLM: mean cosine of sentence embeddings to fp32 over the 256 built-in evaluation sentences. "
             "`all` = secquant quantizes the embedding tables too (RTN at the same bits/format); `linear` = nn.Linear "
             "only, like the hqq row. hqq rows use the package's dequantized weights (its size is not comparable).",
             "", "### Bars", "", "| bar | measured | result |", "|---|---|---|"]
    lines += [f"| {b} | {m} | {r} |" for b, m, r in bars]
    lines += ["", "### MiniLM", "", "| bits | tool | method | scope | mean cosine | size ratio | quantize s |",
              "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["model"] == "minilm":
            lines.append(f"| {r.get('bits')} | {r['tool']} | {r['method']} | {r.get('scope', '')} | "
                         f"{r.get('cosine') if r.get('cosine') is not None else r.get('note', '')} | "
                         f"{r.get('size_ratio') or ''} | {r.get('quantize_s', '')} |")
    lines += ["", "### digits", "", "| method | held-out accuracy | notes |", "|---|---|---|"]
    for r in rows:
        if r["model"] == "digits":
            extra = {k: v for k, v in r.items() if k not in ("model", "tool", "method", "accuracy")}
            lines.append(f"| {r['method']} | {r['accuracy']}% | {json.dumps(extra) if extra else ''} |")
    section = "\n".join(lines) + "\n"
    text = RESULTS.read_text() if RESULTS.exists() else "# secquant benchmark results\n\n"
    text = re.sub(r"## Precision\n.*?(?=\n## |\Z)", "", text, flags=re.S).rstrip() + "\n\n" + section
    RESULTS.write_text(text)
    for b, m, r in bars:
        print(f"BAR {r}: {b}: {m}")


if __name__ == "__main__":
    t0 = time.perf_counter()
    minilm()
    digits()
    write_results(time.perf_counter() - t0)
    sys.exit(0)
