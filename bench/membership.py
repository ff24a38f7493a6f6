#!/usr/bin/env python
"""Membership-inference audit benchmark: does quantizing builtin:digits change what it leaks?

Run from the repository root:

    .venv/bin/python bench/membership.py [--shadows 16] [--epochs 40] [--seed 0] [--ray local]

Quantizes builtin:digits (members = its training split, non-members = its held-out split) with
w8a8, w4a8-dynamic (no static w4a8 preset exists; this is 4-bit group-128 weights with int8 dynamic
per-token activations), w2a8 (PTQ) and w2a8 retrained with QAT (15 epochs, `secquant qat`), then runs
`audit_membership` (loss threshold + offline LiRA with N shadow models, each trained like the target and
quantized with each target's recipe). Prints one JSON line per model and attack, writes the audit
(privacy_audit.json, privacy_audit_roc.svg) under --out (default $TMPDIR/secquant-bench-membership) and the table into
bench/results_membership.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

import secquant
from secquant.models import load_model
from secquant.audits.membership import audit_membership, summary_rows

ROOT = Path(__file__).resolve().parent
PRESETS = ["w8a8", "w4a8-dynamic", "w2a8"]
QAT = [("w2a8", 15)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shadows", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ray", default=None)
    ap.add_argument("--out", type=Path, default=Path(tempfile.gettempdir()) / "secquant-bench-membership")
    ap.add_argument("--results", type=Path, default=ROOT / "results_membership.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    load1 = os.getloadavg()[0]
    handle = load_model("builtin:digits")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        arts = []
        for p in PRESETS:
            secquant.quantize(handle, p, out=Path(tmp) / p)
            arts.append(Path(tmp) / p)
        for p, ep in QAT:
            secquant.qat(handle, p, epochs=ep, out=Path(tmp) / f"{p}-qat")
            arts.append(Path(tmp) / f"{p}-qat")
        tick = lambda label, total: (lambda n: print(f"{label}: +{n}", file=sys.stderr, flush=True))
        res = audit_membership(handle, arts, shadows=args.shadows, epochs=args.epochs, seed=args.seed,
                               ray=args.ray, out=args.out, overwrite=True, progress=tick)
    wall = time.perf_counter() - t0
    rows = summary_rows(res)
    for r in rows:
        print(json.dumps(r))
    names = {n: n.replace("+qat", " (QAT, 15 epochs)") for n in res["models"]}
    lines = [
        "## Membership inference (builtin:digits)",
        "",
        (f"Command: `.venv/bin/python bench/membership.py --shadows {args.shadows} --epochs {args.epochs} "
         f"--seed {args.seed}{' --ray ' + args.ray if args.ray else ''}`  "),
        (f"Date: {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; machine: {platform.processor() or platform.machine()}, "
         f"{os.cpu_count()} cores, torch {torch.__version__}, 1 thread; load average at start {load1:.2f} "
         f"(shared with other jobs: wall time is inflated). Wall time (quantize + shadows + attacks): {wall:.0f} s."),
        "",
        (f"Members: {res['n_members']} (training split), non-members: {res['n_nonmembers']} (held-out split). "
         f"LiRA offline, {res['shadows']} shadow models x {res['shadow_epochs']} epochs, {res['variance']} variance; "
         "each shadow is quantized with each target's recipe (QAT targets: shadows QAT-retrained the same way). "
         "w4a8 = `w4a8-dynamic` (no static w4a8 preset). "
         f"{res['note']}."),
        "",
        "| model | attack | acc. members | acc. non-members | AUC | TPR @ 1% FPR | TPR @ 0.1% FPR |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {names[r['model']]} | {r['attack']} | {r['accuracy_members']:.4f} | "
                     f"{r['accuracy_nonmembers']:.4f} | {r['auc']:.4f} | {r['tpr_at_1pct_fpr']:.4f} | "
                     f"{r['tpr_at_0.1pct_fpr']:.4f} |")
    lines += ["", f"ROC plot (log-log) and full JSON written to `{args.out}` (not committed).", ""]
    tmp = args.results.with_name(args.results.name + ".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(args.results)
    print(f"wrote {args.results} and {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
