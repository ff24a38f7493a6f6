#!/usr/bin/env python
"""Watermark benchmark (issue 15): the cost of marking, detection after attacks by someone without the key, and
false positives over many keys.

Run from the repository root:

    .venv/bin/python bench/watermark.py [--keys 8] [--null-keys 1000] [--no-minilm]

Prints one JSON line per result to stdout and writes bench/results_watermark.md (pasted into RESULTS.md as the
"Watermark" section). Progress goes to stderr.

builtin:digits (held-out accuracy, 899 digits), every integer preset:
  * fidelity: accuracy unmarked vs marked with `--keys` keys (default band);
  * attacks on the model marked with key 0, each with its accuracy and the z of the same attack on the unmarked
    model (control): +-1 on 25/50/100% of the codes; Gaussian noise of sigma x each layer's weight RMS on the
    dequantized weights; re-quantizing the dequantized weights with every preset; one epoch of fine-tuning (SGD lr
    1e-2 momentum 0.9, Adam lr 1e-3, batch 64) of the dequantized float model, and that re-quantized with the same
    preset; magnitude pruning of 20/50% of each layer's weights; a function-preserving reparametrization (hidden
    units permuted, signed channel scales);
  * false positives: `--null-keys` keys (not key 0) against, for each reference (the owner's marked model of a
    preset), the unmarked quantizations with every preset and the marked model itself.
builtin:minilm (mean cosine to fp32 over the 256 built-in evaluation sentences): fidelity for w8a16, w8a8,
w8a8-dynamic, w4a16; attacks on w8a8 and w4a16 (+-1 codes, Gaussian noise, pruning, re-quantization with two other
presets, one epoch of unsupervised SimCSE fine-tuning on the 256 calibration sentences with AdamW lr 2e-5 and 1e-4, a
permutation of every feed-forward layer's 1536 units); false positives as for digits (unmarked same preset, unmarked
other preset, marked model).
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import hashlib
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_counters, machine_line, other_load, source_fingerprint  # noqa: E402

import secquant  # noqa: E402
from secquant.audits.watermark_attacks import code_noise, finetune, gaussian_noise, prune  # noqa: E402
from secquant.models import ModelHandle, load_model  # noqa: E402
from secquant.models.digits import splits  # noqa: E402
from secquant.models.encoder import builtin_sentences  # noqa: E402
from secquant.security.watermark import (  # noqa: E402
    as_key,
    collect_evidence,
    dequantized_float,
    embed_watermark,
    score,
    tail_bound,
)
from secquant.security.watermark_params import DEFAULT_THRESHOLD  # noqa: E402

DIGITS_PRESETS = ["w8a8", "w8a8-dynamic", "w8a16", "w4a16", "w4a8-dynamic", "w4a16-gptq"]
DIGITS_REQUANT = ["w8a16", "w8a8", "w4a16-rtn", "w4a16", "w4a16-gptq", "nf4"]
MINILM_PRESETS = ["w8a16", "w8a8", "w8a8-dynamic", "w4a16"]
MINILM_ATTACKED = {"w8a8": ["w8a8-dynamic", "w4a16-rtn"], "w4a16": ["w8a16", "w4a16-rtn"]}
MINILM_CROSS = {"w8a16": "w4a16", "w8a8": "w8a16", "w8a8-dynamic": "w4a16", "w4a16": "w8a16"}
FRACTIONS = [0.25, 0.5, 1.0]
SIGMAS = {"digits": [0.01, 0.02, 0.05, 0.1], "minilm": [0.01, 0.03, 0.1]}
RESULTS = Path(__file__).resolve().parent / "results_watermark.md"
Z_DETECT = 4.982  # tail_bound(z) <= 1e-6 from here on


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def emit(rec: dict) -> dict:
    print(json.dumps(rec), flush=True)
    return rec


def key(i: int) -> bytes:
    """Reproducible 32-byte bench keys (real keys come from `secquant watermark keygen`)."""
    return hashlib.sha256(f"secquant-bench-watermark-key-{i}".encode()).digest()


# ------------------------------------------------------------------------------------------- attacks


def requant(h: ModelHandle, float_like: torch.nn.Module, preset: str) -> torch.nn.Module:
    return secquant.quantize(ModelHandle(float_like, h.spec, h.rebuild, h.adapter, h.arch_files), preset).module


def finetune_digits(f: torch.nn.Module, opt: str, lr: float) -> torch.nn.Module:
    """One epoch on the member split (batch 64, fixed order)."""
    d = splits()
    return finetune(f, d["train_x"], d["train_y"], opt, lr, seed=1)


def finetune_minilm(h: ModelHandle, f: torch.nn.Module, lr: float) -> torch.nn.Module:
    """One epoch of unsupervised SimCSE (two dropout views of a sentence are the positive pair, the batch the
    negatives, temperature 0.05) on the 256 built-in calibration sentences, batch 32, AdamW: an attacker tuning the
    stolen encoder on their own text."""
    texts = builtin_sentences()[1]
    f.train()
    params = [p for p in f.parameters() if p.is_floating_point()]
    for p in params:
        p.requires_grad_(True)
    o = torch.optim.AdamW(params, lr=lr)
    g = torch.Generator().manual_seed(1)
    order = torch.randperm(len(texts), generator=g).tolist()
    torch.manual_seed(1)
    for i in range(0, len(order), 32):
        batch = h.adapter.encode([texts[j] for j in order[i:i + 32]])
        a, b = f(**batch), f(**batch)
        logits = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T / 0.05
        o.zero_grad()
        torch.nn.functional.cross_entropy(logits, torch.arange(len(a))).backward()
        o.step()
    for p in params:
        p.requires_grad_(False)
    return f.eval()


@torch.no_grad()
def reparametrize_digits(f: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Function-preserving: permute the hidden units of every layer (conv channels with their BatchNorm and the next
    layer's inputs; the first Linear's units), then scale them by signed factors exp(N(0,1)) (conv, compensated by
    BatchNorm) and positive ones (Linear, compensated by the next Linear's inputs)."""
    g = torch.Generator().manual_seed(seed)
    (c1, b1, c2, b2), (l1, l2) = (f.features[i] for i in (0, 1, 3, 4)), (f.classifier[1], f.classifier[3])
    p = torch.randperm(16, generator=g)
    for t in (c1.weight, c1.bias, b1.weight, b1.bias, b1.running_mean, b1.running_var):
        t.copy_(t[p])
    c2.weight.copy_(c2.weight[:, p])
    q = torch.randperm(32, generator=g)
    for t in (c2.weight, c2.bias, b2.weight, b2.bias, b2.running_mean, b2.running_var):
        t.copy_(t[q])
    l1.weight.copy_(l1.weight[:, (q[:, None] * 16 + torch.arange(16)).reshape(-1)])
    r = torch.randperm(64, generator=g)
    l1.weight.copy_(l1.weight[r])
    l1.bias.copy_(l1.bias[r])
    l2.weight.copy_(l2.weight[:, r])
    for conv, bn in ((c1, b1), (c2, b2)):
        n = conv.out_channels
        c = torch.exp(torch.randn(n, generator=g)) * torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
        conv.weight.mul_(c[:, None, None, None])
        conv.bias.mul_(c)
        bn.running_mean.mul_(c)
        bn.running_var.mul_(c * c)
        bn.weight.mul_(torch.sign(c))
    c = torch.exp(torch.randn(64, generator=g))
    l1.weight.mul_(c[:, None])
    l1.bias.mul_(c)
    l2.weight.div_(c[None, :])
    return f


@torch.no_grad()
def permute_ffn(f: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Function-preserving: permute the 1536 intermediate units of every MiniLM feed-forward block."""
    g = torch.Generator().manual_seed(seed)
    for layer in f.transformer.encoder.layer:
        up, down = layer.intermediate.dense, layer.output.dense
        p = torch.randperm(up.out_features, generator=g)
        up.weight.copy_(up.weight[p])
        up.bias.copy_(up.bias[p])
        down.weight.copy_(down.weight[:, p])
    return f


# ------------------------------------------------------------------------------------------- measuring


def verdict(suspect, marked, h, k=0) -> dict:
    ev = collect_evidence(suspect, reference=marked, float_model=h.module)
    r = score(ev, key(k))
    n = sum(v["n"] for v in ev.layers.values())
    noise = sum(v["noise_row_median_steps"] * v["n"] for v in ev.layers.values()) / n
    return {"z": r.z, "log10_p": r.log10_p_value, "detected": r.detected, "noise_rms_steps": noise}


class Digits:
    def __init__(self) -> None:
        self.h = load_model("builtin:digits")
        self.d = splits()

    def metric(self, module: torch.nn.Module) -> float:
        with torch.no_grad():
            return float((module(self.d["test_x"]).argmax(1) == self.d["test_y"]).float().mean()) * 100


class MiniLM:
    def __init__(self) -> None:
        self.h = load_model("builtin:minilm")
        self.batches = [b for b, _ in self.h.adapter.eval_batches(None, 32)]
        with torch.no_grad():
            self.ref = [self.h.run(self.h.module, b) for b in self.batches]

    @torch.no_grad()
    def metric(self, module: torch.nn.Module) -> float:
        module.eval()
        cos = [torch.nn.functional.cosine_similarity(self.h.run(module, b), r, dim=-1)
               for b, r in zip(self.batches, self.ref)]
        return float(torch.cat(cos).mean())


def attack_row(model: str, preset: str, attack: str, suspect, control, marked, env, base: float) -> dict:
    t0 = time.perf_counter()
    v = verdict(suspect, marked, env.h)
    value = env.metric(suspect)
    rec = {"model": model, "preset": preset, "case": "attack", "attack": attack, **v, "metric": value,
           "cost": base - value, "verify_s": time.perf_counter() - t0}
    if control is not None:
        rec["control_z"] = verdict(control, marked, env.h)["z"]
    return emit(rec)


def null_scores(refs_suspects: dict[tuple[str, str], object], keys: range) -> dict[tuple[str, str], list[float]]:
    """z of every (reference, suspect) evidence for every key; one key stream per key and layer, shared by all."""
    evs = {k_: (ev, {n: a.float() for n, a in ev.a.items()}, math.sqrt(sum(float(a @ a) for a in ev.a.values())))
           for k_, ev in refs_suspects.items()}
    names: dict[str, int] = {}
    for ev, _, _ in evs.values():
        for n, a in ev.a.items():
            names[n] = a.numel()
    out: dict[tuple[str, str], list[float]] = {k_: [] for k_ in evs}
    for i, ki in enumerate(keys):
        k = as_key(key(ki))
        s = dict.fromkeys(evs, 0.0)
        for n, numel in names.items():
            signs = k.layer_signs(n, numel)
            for k_, (ev, a32, _) in evs.items():
                if n in a32:
                    s[k_] += float(signs @ a32[n])
        for k_, (_, _, norm) in evs.items():
            out[k_].append(s[k_] / norm)
        if i % 100 == 99:
            log(f"  null keys: {i + 1}/{len(keys)}")
    return out


def null_summary(model: str, zs: dict[tuple[str, str], list[float]], n_keys: int) -> dict:
    allz = [z for v in zs.values() for z in v]
    ps = [tail_bound(z)[0] for z in allz]
    return emit({"model": model, "case": "null", "pairs": len(zs), "keys": n_keys, "tests": len(allz),
                 "detected": sum(p <= DEFAULT_THRESHOLD for p in ps), "max_z": max(allz), "min_p": min(ps),
                 "mean_z": statistics.mean(allz), "sd_z": statistics.pstdev(allz),
                 "share_p_le_0.01": sum(p <= 0.01 for p in ps) / len(ps),
                 "share_p_le_0.1": sum(p <= 0.1 for p in ps) / len(ps),
                 "pairs_list": [f"{r} <- {s}" for r, s in zs]})


# ------------------------------------------------------------------------------------------- runs


def bench_digits(n_keys: int, null_keys: range) -> list[dict]:
    env = Digits()
    h = env.h
    out = [emit({"model": "digits", "case": "float", "metric": env.metric(h.module)})]
    unmarked, marked = {}, {}
    for preset in DIGITS_PRESETS:
        log(f"digits {preset}: fidelity")
        qm = secquant.quantize(h, preset)
        unmarked[preset] = qm.module
        base = env.metric(qm.module)
        vals, reps = [], []
        for i in range(n_keys):
            m = copy.deepcopy(qm.module)
            reps.append(embed_watermark(m, h.module, key(i)))
            vals.append(env.metric(m))
            if i == 0:
                marked[preset] = m
        out.append(emit({"model": "digits", "preset": preset, "case": "fidelity", "keys": n_keys,
                         "tau": reps[0].tau, "n": reps[0].n, "changed": statistics.mean(r.changed for r in reps),
                         "z": statistics.mean(r.z for r in reps), "min_z": min(r.z for r in reps),
                         "unmarked": base, "marked_mean": statistics.mean(vals), "marked_min": min(vals),
                         "marked_max": max(vals), "cost": base - statistics.mean(vals)}))
    for preset in DIGITS_PRESETS:
        log(f"digits {preset}: attacks")
        m, u = marked[preset], unmarked[preset]
        base = env.metric(m)
        for frac in FRACTIONS:
            out.append(attack_row("digits", preset, f"pm1 {frac:.0%}", code_noise(m, frac, 7), code_noise(u, frac, 7),
                                  m, env, base))
        for sigma in SIGMAS["digits"]:
            out.append(attack_row("digits", preset, f"gauss {sigma:g}", gaussian_noise(h.module, m, sigma, 7),
                                  gaussian_noise(h.module, u, sigma, 7), m, env, base))
        for frac in (0.2, 0.5):
            out.append(attack_row("digits", preset, f"prune {frac:.0%}", prune(h.module, m, frac),
                                  prune(h.module, u, frac), m, env, base))
        for target in DIGITS_REQUANT:
            out.append(attack_row("digits", preset, f"requant {target}",
                                  requant(h, dequantized_float(h.module, m), target),
                                  requant(h, dequantized_float(h.module, u), target), m, env, base))
        for opt, lr in (("sgd", 1e-2), ("adam", 1e-3)):
            ft = finetune_digits(dequantized_float(h.module, m), opt, lr)
            ftu = finetune_digits(dequantized_float(h.module, u), opt, lr)
            out.append(attack_row("digits", preset, f"finetune {opt} {lr:g}", ft, ftu, m, env, base))
            out.append(attack_row("digits", preset, f"finetune {opt} {lr:g} + requant", requant(h, ft, preset),
                                  requant(h, ftu, preset), m, env, base))
        out.append(attack_row("digits", preset, "reparametrize",
                              reparametrize_digits(dequantized_float(h.module, m), 3),
                              reparametrize_digits(dequantized_float(h.module, u), 3), m, env, base))
    log(f"digits: {len(null_keys)} null keys")
    pairs = {(r, s): collect_evidence(unmarked[s], reference=marked[r], float_model=h.module)
             for r in DIGITS_PRESETS for s in DIGITS_PRESETS}
    pairs.update({(r, f"{r} marked"): collect_evidence(marked[r], reference=marked[r], float_model=h.module)
                  for r in DIGITS_PRESETS})
    out.append(null_summary("digits", null_scores(pairs, null_keys), len(null_keys)))
    return out


def bench_minilm(null_keys: range) -> list[dict]:
    env = MiniLM()
    h = env.h
    out = []
    unmarked, marked = {}, {}
    for preset in MINILM_PRESETS:
        log(f"minilm {preset}: quantize, mark")
        t0 = time.perf_counter()
        qm = secquant.quantize(h, preset)
        tq = time.perf_counter() - t0
        unmarked[preset] = qm.module
        base = env.metric(qm.module)
        m = copy.deepcopy(qm.module)
        t0 = time.perf_counter()
        rep = embed_watermark(m, h.module, key(0))
        te = time.perf_counter() - t0
        t0 = time.perf_counter()
        v = verdict(m, m, h)
        tv = time.perf_counter() - t0
        marked[preset] = m
        value = env.metric(m)
        out.append(emit({"model": "minilm", "preset": preset, "case": "fidelity", "keys": 1, "tau": rep.tau,
                         "n": rep.n, "changed": rep.changed, "z": rep.z, "verify_z": v["z"], "unmarked": base,
                         "marked_mean": value, "cost": base - value, "quantize_s": tq, "embed_s": te,
                         "verify_s": tv}))
    for preset, targets in MINILM_ATTACKED.items():
        log(f"minilm {preset}: attacks")
        m = marked[preset]
        base = env.metric(m)
        for frac in FRACTIONS:
            out.append(attack_row("minilm", preset, f"pm1 {frac:.0%}", code_noise(m, frac, 7), None, m, env, base))
        for sigma in SIGMAS["minilm"]:
            out.append(attack_row("minilm", preset, f"gauss {sigma:g}", gaussian_noise(h.module, m, sigma, 7), None, m,
                                  env, base))
        for frac in (0.2, 0.5):
            out.append(attack_row("minilm", preset, f"prune {frac:.0%}", prune(h.module, m, frac), None, m, env, base))
        for target in targets:
            out.append(attack_row("minilm", preset, f"requant {target}",
                                  requant(h, dequantized_float(h.module, m), target),
                                  None, m, env, base))
        for lr in (2e-5, 1e-4):
            ft = finetune_minilm(h, dequantized_float(h.module, m), lr)
            out.append(attack_row("minilm", preset, f"finetune simcse {lr:g}", ft, None, m, env, base))
        if preset == "w8a8":
            out.append(attack_row("minilm", preset, "permute ffn", permute_ffn(dequantized_float(h.module, m), 3),
                                  None, m, env, base))
    log(f"minilm: {len(null_keys)} null keys")
    pairs = {}
    for r in MINILM_PRESETS:
        for s in (r, MINILM_CROSS[r]):
            pairs[(r, s)] = collect_evidence(unmarked[s], reference=marked[r], float_model=h.module)
        pairs[(r, f"{r} marked")] = collect_evidence(marked[r], reference=marked[r], float_model=h.module)
    out.append(null_summary("minilm", null_scores(pairs, null_keys), len(null_keys)))
    return out


# ------------------------------------------------------------------------------------------- report


def _cell(r: dict, model: str) -> str:
    ok = "" if r["detected"] else " (no)"
    value = f"{r['metric']:.2f}" if model == "digits" else f"{r['metric']:.4f}"
    cost = f"{-r['cost']:+.2f}" if model == "digits" else f"{-r['cost']:+.4f}"
    return f"{r['z']:.1f}{ok} / {value} ({cost})"


def write_md(rows: list[dict], cmd: str, header: list[str]) -> str:
    L = ["## Watermark (`secquant watermark`)", "", *header, "",
         "Scheme `secquant.watermark.spread.v2`: each weight's rounding is biased toward a keyed sign (elements within "
         "tau steps of the rounding boundary); detection correlates the suspect's weights, mapped onto the owner's "
         "grid, minus the owner's float weights with the signs (per-row inverse-variance weights, after undoing "
         "permutations and signed scales of hidden units). The p-value is a bound valid for any unmarked model: "
         "min(Hoeffding, Bentkus-Dzindzalieta) for a weighted sum of random signs; detection at p <= 1e-6, i.e. "
         "z >= 4.98. Default band: tau = min(0.06, 200 / sqrt(12 N)) steps.", ""]
    fid = [r for r in rows if r.get("case") == "fidelity"]
    L += ["### Cost of marking", "",
          "Digits: held-out accuracy (%) over the keys (one digit = 0.11 points; one standard error of the accuracy "
          "is 0.47 points); MiniLM: mean cosine to fp32 over the 256 evaluation sentences (key 0).", "",
          "| model | preset | tau (steps) | weights changed / total | z of the fresh mark | unmarked | marked: mean "
          "(min..max) | cost |", "|---|---|---|---|---|---|---|---|"]
    for r in fid:
        if r["model"] == "digits":
            val = f"{r['marked_mean']:.2f} ({r['marked_min']:.2f}..{r['marked_max']:.2f}), {r['keys']} keys"
            L.append(f"| digits | {r['preset']} | {r['tau']:.3f} | {r['changed']:.0f} / {r['n']} | {r['z']:.1f} "
                     f"(min {r['min_z']:.1f}) | {r['unmarked']:.2f} | {val} | {r['cost']:+.3f} points |")
        else:
            L.append(f"| MiniLM | {r['preset']} | {r['tau']:.4f} | {r['changed']} / {r['n']} | {r['z']:.0f} | "
                     f"{r['unmarked']:.5f} | {r['marked_mean']:.5f} | {r['cost']:+.5f} |")
    mini = [r for r in fid if r["model"] == "minilm"]
    if mini:
        L += ["", "MiniLM times (s, 2 shared cores): " + "; ".join(
            f"{r['preset']} quantize {r['quantize_s']:.0f}, embed {r['embed_s']:.0f}, verify {r['verify_s']:.0f}"
            for r in mini) + "."]
    for model, label in (("digits", "Digits"), ("minilm", "MiniLM")):
        att = [r for r in rows if r.get("case") == "attack" and r["model"] == model]
        if not att:
            continue
        presets = list(dict.fromkeys(r["preset"] for r in att))
        attacks = list(dict.fromkeys(r["attack"] for r in att))
        unit = "accuracy %, change in points" if model == "digits" else "mean cosine, change"
        L += ["", f"### {label}: attacks on the marked model (key 0)", "",
              f"Cell: z (detected unless marked 'no') / {unit} against the marked model. 'noise' is the median over "
              "rows of the RMS of the suspect's weights minus the float weights, in the owner's steps (weighted by "
              "layer size), for the first preset.", "",
              "| attack | noise (steps) | " + " | ".join(presets) + " |", "|---|---|" + "---|" * len(presets)]
        for a in attacks:
            cells = {r["preset"]: r for r in att if r["attack"] == a}
            first = cells[presets[0]] if presets[0] in cells else next(iter(cells.values()))
            L.append(f"| {a} | {first['noise_rms_steps']:.2f} | " + " | ".join(
                _cell(cells[p], model) if p in cells else "" for p in presets) + " |")
        ctl = [r["control_z"] for r in att if "control_z" in r]
        if ctl:
            L += ["", f"The same {len(ctl)} attacks on the unmarked models (controls): z from {min(ctl):.2f} to "
                  f"{max(ctl):.2f}, none detected." if max(ctl) < Z_DETECT else
                  f"Controls: max z {max(ctl):.2f} (DETECTED: a false positive)."]
    nulls = [r for r in rows if r.get("case") == "null"]
    if nulls:
        L += ["", "### False positives (keys other than the owner's)", "",
              "Every key against every (reference, suspect) pair: the reference is the owner's model marked with key 0 "
              "for a preset; suspects are the independently quantized unmarked models (that preset and others) and "
              "the marked model itself.", "",
              "| model | pairs | keys | tests | detected (p <= 1e-6) | max z | smallest p | share p <= 0.01 | "
              "share p <= 0.1 | z mean / sd |", "|---|---|---|---|---|---|---|---|---|---|"]
        for r in nulls:
            L.append(f"| {r['model']} | {r['pairs']} | {r['keys']} | {r['tests']} | {r['detected']} | "
                     f"{r['max_z']:.2f} | "
                     f"{r['min_p']:.3g} | {r['share_p_le_0.01']:.4f} | {r['share_p_le_0.1']:.4f} | "
                     f"{r['mean_z']:+.3f} / {r['sd_z']:.3f} |")
    L += ["", "### How to read this", "",
          "* The p-value needs no model of the attack: on a model not marked with the key, the signs are independent "
          "of the suspect's weights, so the score is a weighted sum of random signs whatever was done to the model. "
          "The shares of p <= 0.01 and 0.1 stay at or under 0.01 and 0.1 (the bound is conservative).",
          "* z grows with the square root of the number of weights: digits has 38 k, MiniLM 22.7 M (about 24x the "
          "z at the same tau; the default tau is smaller there, so its cost is too).",
          "* Noise independent of the key only adds variance: z falls roughly as 1 / sqrt(1 + 12 noise^2) (noise in "
          "steps). Re-quantizing an 8-bit mark onto a 4-bit grid adds ~4 steps of noise: digits' z drops to a few, "
          "MiniLM's stays far above the threshold.",
          "* The bar of issue 15 (+-1 on 50% of the codes: still detected, or a cost of at least 2 points) is the "
          "'pm1 50%' row."]
    text = "\n".join(L) + "\n"
    RESULTS.write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keys", type=int, default=8, help="keys per preset for the digits fidelity cost")
    ap.add_argument("--null-keys", type=int, default=1000, help="keys for the false-positive measurement")
    ap.add_argument("--no-minilm", action="store_true")
    args = ap.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", "2"))
    torch.set_num_threads(threads)
    start, cpu0 = time.perf_counter(), cpu_counters()
    load0 = os.getloadavg()[0]
    null_keys = range(1000, 1000 + args.null_keys)
    rows = bench_digits(args.keys, null_keys)
    if not args.no_minilm:
        rows += bench_minilm(null_keys)
    total = time.perf_counter() - start
    cmd = " ".join([".venv/bin/python", "bench/watermark.py", *sys.argv[1:]])
    header = [f"- Command: `{cmd}` (from the repository root)",
              f"- Date: {dt.datetime.now(dt.UTC):%a %b %d %H:%M:%S UTC %Y}",
              f"- Machine: {machine_line(threads)}",
              f"- Source: {source_fingerprint()}",
              f"- Total runtime: {total:.0f} s",
              f"- Contention: {other_load(cpu0, total)}; 1-minute load average at start / end {load0:.2f} / "
              f"{os.getloadavg()[0]:.2f}. Times are inflated by sharing; z, p, accuracy and cosine are not."]
    write_md(rows, cmd, header)
    log(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
