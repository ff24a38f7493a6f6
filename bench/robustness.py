#!/usr/bin/env python
"""Robustness benchmark on builtin:digits: adversarial (FGSM/PGD), defensive QAT, bit flips,
and the planted quantization-conditioned backdoor with its detection and defence.

Run from the repository root:

    .venv/bin/python bench/robustness.py [--quick]

Prints one JSON line per result to stdout and writes bench/results_robustness.md (and the
plot with --plot FILE.svg). --quick uses fewer samples/steps (smoke run only).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

# One thread: on the shared 2-core box an intra-op pool makes these tiny models far slower (contention).
torch.set_num_threads(1)

import secquant  # noqa: E402
from secquant.models import load_model  # noqa: E402
from secquant.models.digits import splits  # noqa: E402
from secquant.quant.algorithms import quantize_model  # noqa: E402
from secquant.recipes import get_preset  # noqa: E402
from secquant.audits.bitflip import bitflip_audit  # noqa: E402
from secquant.audits.divergence import (  # noqa: E402
    PLANT_RECIPE, backdoor_rates, divergence_test, keyed_randomized_rounding, plant_quantization_backdoor,
)
from secquant.audits.robustness import defensive_comparison, plot_robustness, robust_accuracy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ["w8a8", "w4a8-dynamic", "w2a8"]
SRC, TGT = 3, 8


def emit(kind: str, **kw) -> dict:
    rec = {"bench": "robustness", "kind": kind, **kw}
    print(json.dumps(rec, default=float), flush=True)
    return rec


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def pct(v: float) -> str:
    return f"{100 * v:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--md", type=Path, default=ROOT / "bench" / "results_robustness.md")
    ap.add_argument("--plot", type=Path, default=None, help="also write the accuracy-vs-epsilon plot (.svg/.png)")
    args = ap.parse_args()
    t0, load0 = time.time(), os.getloadavg()[0]
    ru0 = resource.getrusage(resource.RUSAGE_SELF)
    h = load_model("builtin:digits")
    d = splits()
    xt, yt = d["test_x"], d["test_y"]
    if args.quick:
        xt, yt = xt[:200], yt[:200]
    steps = 3 if args.quick else 10
    eps = [0.0, 0.02, 0.05, 0.1, 0.2]
    md: list[str] = []

    # 1. adversarial grid -----------------------------------------------------------------
    log("adversarial grid")
    models = {"fp32": h.module}
    for p in PRESETS:
        models[p] = secquant.quantize(h, p).module
    grid = robust_accuracy(models, xt, yt, eps, steps=steps)
    if args.plot:
        plot_robustness(grid, args.plot)
    for n, r in grid["models"].items():
        emit("adversarial", model=n, eps=eps, **r)
    md += ["## Adversarial robustness (builtin:digits, held-out split)", "",
           f"L-inf attacks on [0,1] pixels, {len(yt)} samples; PGD {steps} steps, step 2.5*eps/steps, random start. "
           "White-box attacks on quantized models use straight-through (BPDA) gradients through the activation "
           "quantizers; *transfer* = examples crafted on fp32, evaluated on the quantized model. "
           "Plot: `--plot FILE.svg` (or `secquant audit robustness --out DIR`).", "",
           "| model | attack | " + " | ".join(f"eps={e}" for e in eps) + " |", "|---|---|" + "---|" * len(eps)]
    for n, r in grid["models"].items():
        for k in ("fgsm", "pgd", "fgsm_transfer", "pgd_transfer"):
            if k in r:
                md.append(f"| {n} | {k.replace('_', ' ')} | " + " | ".join(pct(v) for v in r[k]) + " |")

    # 2. defensive QAT ----------------------------------------------------------------------
    md += ["", "## Defensive quantization (Lipschitz-regularized QAT)", "",
           "Same LSQ QAT run twice from the pretrained model (seed 0, 8 epochs, lr 1e-3): plain, and with "
           "beta * sum ||W W^T - I||_F^2 added to the loss (beta=1e-3). PGD as above.", "",
           "| preset | model | clean | " + " | ".join(f"PGD eps={e}" for e in eps[1:]) + " |",
           "|---|---|---|" + "---|" * (len(eps) - 1)]
    for p in ["w4a4", "w2a8"]:
        log(f"defensive QAT {p}")
        dq = defensive_comparison(h.module, get_preset(p), (d["train_x"], d["train_y"]), (xt, yt),
                                  epochs=2 if args.quick else 8, beta=1e-3, eps_grid=eps, steps=steps)
        for n, r in dq["models"].items():
            emit("defensive_qat", preset=p, model=n, eps=eps, **r)
            md.append(f"| {p} | {n} | {pct(r['clean'])} | " + " | ".join(pct(v) for v in r["pgd"][1:]) + " |")

    # 3. bit flips --------------------------------------------------------------------------
    md += ["", "## Bit-flip attack (progressive bit search) vs random flips, with the integrity check", "",
           "Attack batch: 128 training-split samples; accuracy on the held-out split; stop below 20% or at 100 "
           "flips; 4 candidates per layer per iteration. Random: the same number of distinct random bits, "
           "5 seeds, mean. Integrity: `IntegrityGuard` (keyed checksums over 64-byte groups) built before the "
           "attack; detection = share of flipped bits inside a group `check()` reports; repair zeroes those groups.",
           "", "| preset | clean | flips to <20% | acc. after attack | acc. after same # random flips | "
           "detection (attack) | acc. after repair (attack) | detection (random) | acc. after repair (random) |",
           "|---|---|---|---|---|---|---|---|---|"]
    for p in PRESETS:
        log(f"bit flips {p}")
        res = bitflip_audit(models[p], (d["train_x"][:128], d["train_y"][:128]), (xt, yt),
                            max_flips=30 if args.quick else 100, random_trials=2 if args.quick else 5, integrity=True)
        a, i = res["attack"], res["integrity"]
        a.pop("flip_list")
        emit("bitflip", preset=p, **{k: v for k, v in res.items()})
        flips = f"{a['flips']}" if a["reached_target"] else f">{a['flips']} (not reached)"
        md.append(f"| {p} | {pct(res['clean_accuracy'])} | {flips} | {pct(a['final_accuracy'])} | "
                  f"{pct(res['random']['accuracy_mean'])} | {pct(i['attack']['detection_rate'] or 0)} | "
                  f"{pct(i['attack']['accuracy_after_repair'])} | {pct(i['random']['detection_rate_mean'])} | "
                  f"{pct(i['random']['accuracy_after_repair_mean'])} |")

    # 4. planted quantization-conditioned backdoor ------------------------------------------
    log("planted backdoor")

    def rtn(m, recipe):
        q = __import__("copy").deepcopy(m)
        quantize_model(q, recipe, lambda: (d["train_x"][i:i + 64] for i in range(0, 256, 64)), lambda mm, b: mm(b))
        return q

    md += ["", "## Quantization-conditioned backdoor: planted example, divergence audit, keyed randomized rounding",
           "", f"Planted with `plant_quantization_backdoor` (malicious fine-tune 5 epochs: class {SRC} relabelled "
           f"{TGT}; then PGD repair 20 epochs inside the RTN box, margin 0.45 step, range-defining weights fixed, "
           "biases/BN frozen). Divergence test: one-sided exact binomial test of float-vs-quantized disagreement "
           "against p0 from the worst of 16 copies with U(-s/2, s/2) weight noise, alpha=1e-3 (per class: Bonferroni alpha/10). "
           f"attack success = share of class-{SRC} inputs predicted {TGT}.", "",
           "| recipe | model | float acc. | float attack success | RTN acc. | RTN attack success | divergence p-value "
           "| flagged (classes) |", "|---|---|---|---|---|---|---|---|"]
    planted = {}
    rr_md = ""
    for recipe in [PLANT_RECIPE, get_preset("w8a16")]:
        pm, info = plant_quantization_backdoor(h.module, recipe, d["train_x"], d["train_y"], source_class=SRC,
                                               target_class=TGT, malicious_epochs=5, repair_epochs=20)
        planted[recipe.name] = pm
        for label, fm in [("honest", h.module), ("planted", pm)]:
            q = rtn(fm, recipe)
            fr, qr = backdoor_rates(fm, xt, yt, SRC, TGT), backdoor_rates(q, xt, yt, SRC, TGT)
            dv = divergence_test(fm, q, xt)
            emit("planted", recipe=recipe.name, model=label, float=fr, rtn=qr,
                 divergence={k: dv[k] for k in ("flagged", "p_value", "disagreement_rate", "expected_rate",
                                                 "flagged_classes")})
            md.append(f"| {recipe.name} | {label} | {pct(fr['accuracy'])} | {pct(fr['attack_success'])} | "
                      f"{pct(qr['accuracy'])} | {pct(qr['attack_success'])} | {dv['p_value']:.2g} | "
                      f"{dv['flagged']} {dv['flagged_classes'] or ''} |")
            if label == "planted" and recipe is PLANT_RECIPE:
                rr = [backdoor_rates(keyed_randomized_rounding(q, fm, bytes([k]) * 32), xt, yt, SRC, TGT)
                      for k in range(5)]
                rr_h = [backdoor_rates(keyed_randomized_rounding(rtn(h.module, recipe), h.module, bytes([k]) * 32),
                                       xt, yt, SRC, TGT) for k in range(5)]
                emit("randomized_rounding", recipe=recipe.name, planted=rr, honest=rr_h)
                rr_md = (f"Keyed randomized rounding ({recipe.name}, 5 keys): planted model attack success "
                         f"{pct(min(r['attack_success'] for r in rr))}-{pct(max(r['attack_success'] for r in rr))} "
                         f"(RTN: {pct(qr['attack_success'])}), accuracy {pct(min(r['accuracy'] for r in rr))}-"
                         f"{pct(max(r['accuracy'] for r in rr))} (float {pct(fr['accuracy'])}, RTN "
                         f"{pct(qr['accuracy'])}); honest model accuracy {pct(min(r['accuracy'] for r in rr_h))}-"
                         f"{pct(max(r['accuracy'] for r in rr_h))}.")

    md += ["", rr_md, "", "False positives of the divergence audit on honest artifacts (`secquant.quantize`, presets):", "",
           "| preset | disagreements / n | expected rate | p-value | flagged |", "|---|---|---|---|---|"]
    for p in ["w8a8", "w8a8-dynamic", "w8a16", "w4a16", "w4a8-dynamic", "w4a4", "w2a8"]:
        q = models[p] if p in models else secquant.quantize(h, p).module
        dv = divergence_test(h.module, q, xt)
        emit("divergence_honest", preset=p, **{k: dv[k] for k in ("flagged", "p_value", "disagreements",
                                                                     "n_probe", "expected_rate", "flagged_classes")})
        md.append(f"| {p} | {dv['disagreements']} / {dv['n_probe']} | {pct(dv['expected_rate'])} | "
                  f"{dv['p_value']:.2g} | {dv['flagged']} {dv['flagged_classes'] or ''} |")

    md += ["", "## Notes", "",
           "- At 8 and 4 bits the quantized models are as robust as fp32 (within about a point at every epsilon), "
           "white-box (STE) and transfer alike; the 2-bit model starts far lower, and there the white-box STE "
           "attack is stronger than transfer from fp32.",
           "- The Lipschitz penalty gives at most a couple of points of PGD accuracy here: the digits CNN has "
           "BatchNorm after each convolution, whose per-channel gains the orthogonality penalty does not bound.",
           "- Random flips of the same number of bits do nothing; the progressive bit search needs a few dozen "
           "(2 for the already fragile 2-bit model). The keyed checksums detect every attack flip; repair zeroes "
           "whole 64-byte groups (64 int8 or 128 int4 weights), so accuracy recovers only partly.",
           "- Planting with int8 (w8a16) fails on this ~40k-parameter CNN: the +-0.5-step RTN box is too tight for "
           "the PGD repair, so the float model stays visibly backdoored (low float accuracy) and there is no "
           "float/quantized divergence to find (not flagged, correctly). With 4-bit per-channel weights the "
           "attack works and the audit flags it; keyed randomized rounding removes it.",
           "- The null is the worst of 16 randomly re-rounded copies, so at 2 bits (where rounding noise alone "
           "changes most predictions) the test has little power: it can only flag divergence beyond that."]
    ru1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    wall = time.time() - t0
    head = ["# Robustness audits (builtin:digits)", "",
            f"- Command: `.venv/bin/python bench/robustness.py{' --quick' if args.quick else ''}` (repository root)",
            f"- Date: {time.strftime('%a %b %d %H:%M:%S UTC %Y', time.gmtime())}",
            f"- Machine: {os.cpu_count()} cores, torch.set_num_threads(1); Python {platform.python_version()}, "
            f"torch {torch.__version__}",
            f"- Runtime: {wall:.0f} s wall, {cpu:.0f} CPU-s in this process; 1-minute load average at start / end "
            f"{load0:.2f} / {os.getloadavg()[0]:.2f} (the 2 cores were shared with other engineers' jobs, so "
            "times are inflated; accuracies and flip counts are not affected).", "", ""]
    text = "\n".join(head + md) + "\n"
    tmp = args.md.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, args.md)
    log(f"wrote {args.md}")


if __name__ == "__main__":
    main()
