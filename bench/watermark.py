#!/usr/bin/env python
"""Watermark benchmark: false positives, detection after re-quantization and fine-tuning, fidelity cost.

Run from the repository root:

    .venv/bin/python bench/watermark.py [--keys 5] [--null-keys 20] [--no-minilm]

Prints one JSON line per result to stdout and writes bench/results_watermark.md. Progress goes to stderr.

builtin:digits, for each integer preset:
  * unmarked model verified with `--null-keys` keys: the p-values (all must stay > 1e-9);
  * marked with `--keys` keys (defaults of embed_watermark): held-out accuracy marked vs unmarked, the
    p-value of the marked model, of the marked model verified with other keys (wrong key), after
    re-quantizing its dequantized weights with the same preset, and after fine-tuning the dequantized
    float model (SGD lr 1e-2 momentum 0.9, 3 epochs; Adam lr 1e-4, 2 epochs) then re-quantizing.
builtin:minilm (w8a16, w8a8-dynamic, w4a16): mean cosine to fp32 marked vs unmarked over the built-in
evaluation sentences, p-value marked / unmarked, and after re-quantization.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import secquant
from secquant.api import QuantizedModel
from secquant.models import ModelHandle, load_model
from secquant.models.digits import splits
from secquant.security.watermark import (
    dequantized_float,
    embed_watermark,
    verify_watermark,
)

DIGITS_PRESETS = ["w8a8", "w8a8-dynamic", "w8a16", "w4a16", "w4a8-dynamic", "w4a16-gptq"]
MINILM_PRESETS = ["w8a16", "w8a8-dynamic", "w4a16"]
RESULTS = Path(__file__).resolve().parent / "results_watermark.md"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def emit(rec: dict) -> dict:
    print(json.dumps(rec), flush=True)
    return rec


def key(i: int) -> bytes:
    """Reproducible 32-byte bench keys (real keys come from `secquant watermark keygen`)."""
    return hashlib.sha256(f"secquant-bench-watermark-key-{i}".encode()).digest()


def accuracy(module: torch.nn.Module, d: dict) -> float:
    with torch.no_grad():
        return float((module(d["test_x"]).argmax(1) == d["test_y"]).float().mean()) * 100


def pred_changes(a: torch.nn.Module, b: torch.nn.Module, d: dict) -> int:
    with torch.no_grad():
        return int((a(d["test_x"]).argmax(1) != b(d["test_x"]).argmax(1)).sum())


def requantize(h: ModelHandle, float_like: torch.nn.Module, preset: str) -> QuantizedModel:
    return secquant.quantize(ModelHandle(float_like, h.kind, h.spec, h.rebuild, h.adapter, h.arch_files), preset)


def finetune(module: torch.nn.Module, d: dict, opt: str, lr: float, epochs: int) -> torch.nn.Module:
    module.train()
    params = [p for p in module.parameters()]
    for p in params:
        p.requires_grad_(True)
    o = torch.optim.SGD(params, lr=lr, momentum=0.9) if opt == "sgd" else torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(1)
    x, y = d["train_x"], d["train_y"]
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            o.zero_grad()
            torch.nn.functional.cross_entropy(module(x[b]), y[b]).backward()
            o.step()
    return module.eval()


FINETUNES = [("sgd", 1e-2, 3), ("adam", 1e-4, 2), ("adam", 1e-3, 2)]


def bench_digits(n_keys: int, n_null: int) -> list[dict]:
    h = load_model("builtin:digits")
    d = splits()
    float_acc = accuracy(h.module, d)
    out = []
    for preset in DIGITS_PRESETS:
        log(f"digits {preset}")
        qm = secquant.quantize(h, preset)
        base_acc = accuracy(qm.module, d)
        null = [verify_watermark(qm.module, key(1000 + i)) for i in range(n_null)]
        out.append(emit({"model": "digits", "preset": preset, "case": "unmarked", "keys": n_null,
                         "min_p": min(r.p_value for r in null), "detected": sum(r.detected for r in null)}))
        for i in range(n_keys):
            marked = copy.deepcopy(qm.module)
            e = embed_watermark(marked, h.module, key(i))
            v = verify_watermark(marked, key(i))
            wrong = [verify_watermark(marked, key(2000 + j)) for j in range(max(1, n_null // n_keys))]
            rec = {"model": "digits", "preset": preset, "case": "marked", "key": i, "tau": e.tau,
                   "marked": e.marked, "changed": e.changed, "balanced": e.balanced, "keyed": e.keyed,
                   "float_acc": float_acc, "pred_changes": pred_changes(qm.module, marked, d),
                   "acc_unmarked": base_acc, "acc_marked": accuracy(marked, d),
                   "z": v.z, "log10_p": v.log10_p_value, "detected": v.detected,
                   "wrong_key_min_p": min(r.p_value for r in wrong),
                   "wrong_key_detected": sum(r.detected for r in wrong)}
            again = requantize(h, dequantized_float(h.module, marked), preset).module
            rq = verify_watermark(again, key(i))
            rr = verify_watermark(again, key(i), reference=marked)
            rec.update(requant_z=rq.z, requant_log10_p=rq.log10_p_value, requant_detected=rq.detected,
                       requant_ref_log10_p=rr.log10_p_value, requant_ref_detected=rr.detected,
                       unmarked_ref_p=verify_watermark(qm.module, key(i), reference=marked).p_value)
            if i == 0:
                for opt, lr, ep in FINETUNES:
                    ft = finetune(dequantized_float(h.module, marked), d, opt, lr, ep)
                    q2 = requantize(h, ft, preset)
                    r = verify_watermark(q2.module, key(i))
                    rr = verify_watermark(q2.module, key(i), reference=marked)
                    tag = f"ft_{opt}_{lr:g}_{ep}ep"
                    rec.update({f"{tag}_acc": accuracy(q2.module, d), f"{tag}_log10_p": r.log10_p_value,
                                f"{tag}_detected": r.detected, f"{tag}_ref_log10_p": rr.log10_p_value,
                                f"{tag}_ref_detected": rr.detected})
            out.append(emit(rec))
    return out


def bench_minilm() -> list[dict]:
    h = load_model("builtin:minilm")
    out = []
    for preset in MINILM_PRESETS:
        log(f"minilm {preset}")
        t0 = time.perf_counter()
        qm = secquant.quantize(h, preset)
        tq = time.perf_counter() - t0
        base = secquant.evaluate(qm, against=h.module)["value"]
        null = verify_watermark(qm.module, key(0))
        marked = copy.deepcopy(qm.module)
        t0 = time.perf_counter()
        e = embed_watermark(marked, h.module, key(0))
        te = time.perf_counter() - t0
        t0 = time.perf_counter()
        v = verify_watermark(marked, key(0))
        tv = time.perf_counter() - t0
        cos = secquant.evaluate(QuantizedModel(marked, qm.manifest, h), against=h.module)["value"]
        rq = verify_watermark(requantize(h, dequantized_float(h.module, marked), preset).module, key(0))
        out.append(emit({"model": "minilm", "preset": preset, "case": "marked", "tau": e.tau, "keyed": e.keyed,
                         "marked": e.marked, "changed": e.changed, "balanced": e.balanced, "cos_unmarked": base, "cos_marked": cos,
                         "cos_cost": base - cos, "unmarked_p": null.p_value, "z": v.z,
                         "log10_p": v.log10_p_value, "detected": v.detected, "requant_log10_p": rq.log10_p_value,
                         "requant_detected": rq.detected, "quantize_s": tq, "embed_s": te, "verify_s": tv}))
    return out


def write_md(digits: list[dict], minilm: list[dict], cmd: str, elapsed: float) -> None:
    L = ["# Watermark (`secquant watermark`)", "",
         f"Command: `{cmd}`  ", f"Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, "
         f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
         f"{elapsed:.0f} s wall. Machine load: 2 shared CPU cores with several other jobs running, so "
         "times are inflated; the statistics do not depend on load.", "",
         "Defaults: all elements keyed (fraction 1.0), tau chosen per model for an expected z of 24 "
         "(capped at 0.25 steps), net code shift per granule balanced; detection threshold p <= 1e-9; the "
         "p-value is the exact one-sided binomial tail, Bonferroni-combined over the whole-model test and one "
         "test per layer.", "",
         "## Digits: false positives (unmarked models, different keys)", "",
         "| preset | keys | smallest p | detected |", "|---|---|---|---|"]
    for r in digits:
        if r["case"] == "unmarked":
            L.append(f"| {r['preset']} | {r['keys']} | {r['min_p']:.3g} | {r['detected']} |")
    L += ["", "## Digits: detection, robustness and fidelity (per preset, over keys)", "",
          "log10 p: detection needs <= -9. Accuracy in points on the 899 held-out digits "
          "(one sample = 0.111 points).", "",
          "| preset | keys | tau | changed + balanced / keyed | log10 p marked (worst) | wrong key: detected | "
          "log10 p after re-quant (worst) | same, with --reference (worst) | unmarked with --reference: "
          "smallest p | acc unmarked | acc marked (mean; min..max) | mean cost | predictions changed (mean; max) |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    marked = [r for r in digits if r["case"] == "marked"]
    for preset in DIGITS_PRESETS:
        rs = [r for r in marked if r["preset"] == preset]
        if not rs:
            continue
        accs = [r["acc_marked"] for r in rs]
        cost = rs[0]["acc_unmarked"] - statistics.mean(accs)
        L.append(f"| {preset} | {len(rs)} | {statistics.mean(r['tau'] for r in rs):.3f} | "
                 f"{rs[0]['changed']} + {rs[0]['balanced']} / {rs[0]['keyed']} | {max(r['log10_p'] for r in rs):.1f} | "
                 f"{sum(r['wrong_key_detected'] for r in rs)} | {max(r['requant_log10_p'] for r in rs):.1f} | "
                 f"{max(r['requant_ref_log10_p'] for r in rs):.1f} | {min(r['unmarked_ref_p'] for r in rs):.3g} | "
                 f"{rs[0]['acc_unmarked']:.2f} | {statistics.mean(accs):.2f}; {min(accs):.2f}..{max(accs):.2f} | "
                 f"{cost:+.3f} | {statistics.mean(r['pred_changes'] for r in rs):.1f}; "
                 f"{max(r['pred_changes'] for r in rs)} |")
    L += ["", "## Digits: fine-tuning the dequantized marked model, then re-quantizing (key 0)", "",
          "log10 p from the artifact alone / with `--reference` (the owner's marked artifact).", "",
          "| preset | " + " | ".join(f"{o} lr {lr:g} {ep} ep: acc / log10 p / ref" for o, lr, ep in FINETUNES)
          + " |",
          "|---|" + "---|" * len(FINETUNES)]
    for r in marked:
        if r["key"] != 0:
            continue
        cells = []
        for o, lr, ep in FINETUNES:
            tag = f"ft_{o}_{lr:g}_{ep}ep"
            cells.append(f"{r[tag + '_acc']:.2f} / {r[tag + '_log10_p']:.1f}"
                         + ("" if r[tag + "_detected"] else " (no)") + f" / {r[tag + '_ref_log10_p']:.1f}"
                         + ("" if r[tag + "_ref_detected"] else " (no)"))
        L.append(f"| {r['preset']} | " + " | ".join(cells) + " |")
    if minilm:
        L += ["", "## MiniLM: fidelity and detection (key 0)", "",
              "| preset | tau | changed + balanced / keyed | cos unmarked | cos marked | cost | p unmarked | log10 p marked | "
              "log10 p after re-quant | embed s | verify s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in minilm:
            L.append(f"| {r['preset']} | {r['tau']:.4f} | {r['changed']} + {r['balanced']} / {r['keyed']} | {r['cos_unmarked']:.5f} | "
                     f"{r['cos_marked']:.5f} | {r['cos_cost']:+.6f} | {r['unmarked_p']:.3g} | {r['log10_p']:.1f} | "
                     f"{r['requant_log10_p']:.1f} | {r['embed_s']:.1f} | {r['verify_s']:.1f} |")
    L += ["", "## How to read this", "",
          "* False positives: on a model not marked with the key, code parities are independent of the keyed "
          "bits, so each test is an exact Binomial(n, 1/2) tail and the reported p-value is the probability that "
          "an unmarked model scores as high (the union bound covers the per-layer tests). A detection at "
          "p <= 1e-9 therefore has false-positive probability <= 1e-9; the unmarked rows show the p-values "
          "actually observed.",
          "* Re-quantization: marked weights sit on exact integer codes, so the same recipe rounds them back "
          "unless it re-searches scales. Presets with activation-aware smoothing (w8a8, w4a16, w4a8-dynamic) "
          "re-run the scale search on the dequantized weights and may pick other per-channel scales for the "
          "smoothed Linear layers, which re-rounds their codes (at 8 bits most of the big Linear's marks are "
          "lost); the per-layer tests keep the verdict on the layers whose scales did not move. With "
          "`--reference` (the owner's marked artifact) the suspect's weights are first rounded onto the "
          "reference's grid, which undoes re-searched scales; the null stays exact because that grid was fixed "
          "before marking (the 'unmarked with --reference' column is the check).",
          "* Fine-tuning: marks survive while weights move less than about half a quantization step. Adam moves "
          "every weight by ~lr per step, so 2 epochs at 1e-4 (~28 steps) is about one int8 step: at 8 bits with "
          "smoothing (w8a8) that erases the mark read from the artifact alone; SGD at the same accuracy keeps "
          "it, and with `--reference` even Adam at 1e-3 keeps it.",
          "* Fidelity: one held-out digit is 0.111 points, so single-key accuracy differences are quantized; the "
          "mean over keys is the cost estimate, and 'predictions changed' counts test digits whose predicted "
          "class differs between the marked and unmarked model."]
    RESULTS.write_text("\n".join(L) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=5)
    ap.add_argument("--null-keys", type=int, default=20)
    ap.add_argument("--no-minilm", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    t0 = time.perf_counter()
    digits = bench_digits(args.keys, args.null_keys)
    minilm = [] if args.no_minilm else bench_minilm()
    write_md(digits, minilm, " ".join([".venv/bin/python", "bench/watermark.py", *sys.argv[1:]]),
             time.perf_counter() - t0)
    log(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
