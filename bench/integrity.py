#!/usr/bin/env python
"""Integrity guard benchmark (issue 15): what the run-time checks catch, and what they cost.

Run from the repository root:

    .venv/bin/python bench/integrity.py [--quick] [--skip-minilm] [--write-results]

Prints one JSON line per result and, with --write-results, puts an "## Integrity guard" section in
bench/RESULTS.md. Parts:

1. bar (builtin:digits w8a8, sealed and loaded): random single-bit flips over every tensor the model
   holds (bit 30 of a float, the top bit of an integer, as the issue's attacker did): how many move
   held-out accuracy by more than 1 point, how many `check_integrity()` reports, and how many of them
   the old codes-only guard (`*.qweight`) would have covered.
2. canaries (digits w8a8, the PyTorch module standing in for ONNX Runtime's copy of the weights, which
   no checksum reads): flips are searched that are silent on a canary set (outputs within tolerance),
   as the attacker did against the old public 4-input canary; for each silent flip the held-out
   accuracy drop is measured. Reported per canary set: the old public canary, three secret draws, and
   an attacker's own draw from the same distribution (the best an attacker without the seed can do);
   plus the issue's attack (the 5 most damaging flips silent on the public canary, together).
3. ORT (digits w8a8 exported): random flips in the initializers of model.onnx loaded into a new ONNX
   Runtime session, the canaries run through it: silent flips and their accuracy drop.
4. cost (builtin:minilm w8a8, sealed, served by ONNX Runtime): ms per checksum pass, per canary run,
   per full check; serving throughput with a check every second against none.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

torch.set_num_threads(1)  # shared 2-core box: one intra-op thread per process (see tests/conftest.py)

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_counters, machine_line, other_load, replace_section, source_fingerprint  # noqa: E402

import secquant  # noqa: E402
from secquant.models.digits import splits  # noqa: E402
from secquant.security import keygen, seal  # noqa: E402
from secquant.audits.bitflip import flip_tensor_bit  # noqa: E402
from secquant.security.canary import draw_canaries, outputs_match  # noqa: E402
from secquant.security.integrity import reachable_tensors  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
_OWNERS: dict = {}


def emit(part: str, **kw) -> dict:
    rec = {"bench": "integrity", "part": part, **kw}
    print(json.dumps(rec, default=float), flush=True)
    return rec


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def damaging_bit(t: torch.Tensor) -> int:
    """The issue's flip: bit 30 of a float32 (exponent MSB: x -> ~x * 2^128, or ~0), the top bit of an integer."""
    return 30 if t.dtype == torch.float32 else 8 * t.element_size() - 1


def sealed_loaded(tmp: Path, recipe: str, model: str = "builtin:digits", onnx: bool = False):
    from secquant.runtime import export_onnx

    art = tmp / f"{model.split(':')[-1]}-{recipe}{'-onnx' if onnx else ''}"
    if (tmp / f"{art.name}.age").is_file():
        return art, tmp / f"{art.name}.age", _OWNERS[art.name]
    secquant.quantize(model, recipe, out=art)
    if onnx:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            export_onnx(art)
    owner = keygen(tmp / f"owner-{art.name}")
    sealed = seal(art, [owner.recipient.read_text().strip()], owner.sign_key, tmp / f"{art.name}.age")
    _OWNERS[art.name] = owner
    return art, sealed, owner


# -- 1. the bar ------------------------------------------------------------------------------------

def part_bar(tmp: Path, flips: int) -> dict:
    _, sealed, owner = sealed_loaded(tmp, "w8a8")
    qm = secquant.load(sealed, identity=owner.identity, verify_key=owner.verify_key)
    x, y = splits()["test_x"], splits()["test_y"]

    def acc() -> float:
        return float((qm(x).argmax(1) == y).float().mean())

    clean = acc()
    tensors = reachable_tensors(qm.module)
    rng = random.Random(15)
    moved = reported = moved_reported = moved_old = 0
    worst = (0.0, "")
    for _ in range(flips):
        name = rng.choice(list(tensors))
        t = tensors[name]
        e, bit = rng.randrange(t.numel()), damaging_bit(t)
        flip_tensor_bit(t, e, bit)
        a = acc()
        found = qm.check_integrity()
        flip_tensor_bit(t, e, bit)
        hit = any(c.name == name for c in found)
        reported += hit
        if abs(clean - a) > 0.01:
            moved += 1
            moved_reported += hit
            moved_old += name.endswith(".qweight")
            worst = max(worst, (clean - a, name))
    assert qm.check_integrity() == []
    return emit("bar", model="builtin:digits w8a8 (sealed, loaded)", flips=flips, tensors=len(tensors),
                clean_accuracy=clean, moved_over_1pt=moved, reported=reported, moved_and_reported=moved_reported,
                moved_in_codes_old_guard_scope=moved_old, worst_drop=worst[0], worst_tensor=worst[1])


# -- 2. canaries on the PyTorch module ---------------------------------------------------------------

def candidate_flips(qm, per_tensor: int, rng: random.Random) -> list[tuple[str, int]]:
    """(tensor, element): every element of small tensors, `per_tensor` random ones of large tensors. Both
    the codes (the cache recomputed from them: what ORT's integer copy would suffer) and the float caches
    (what the PyTorch forward reads; a float weight can become ~1e38, an int8 code cannot)."""
    out = []
    for name, t in reachable_tensors(qm.module).items():
        if name.endswith("num_batches_tracked"):
            continue  # not read in eval mode
        n = t.numel()
        elems = range(n) if n <= per_tensor else rng.sample(range(n), per_tensor)
        out += [(name, e) for e in elems]
    return out


def targeted_flips(m, sets: dict) -> list[tuple[str, int]]:
    """The attacker's search against a known canary set: every element of a Linear layer's cached weight
    whose input unit (as the layer reads it, after its input quantizer) is 0 on every input of some set,
    so a flip there cannot move that set's outputs. Done for each set (public, secret, attacker's own)."""
    out = []
    for name, layer in m.named_modules():
        if type(layer).__name__ != "QuantLinear" or layer._w_cache is None:
            continue
        seen = {}
        where = layer.input_quant if layer.input_quant is not None else layer
        hook = where.register_forward_hook(
            lambda _m, i, o, w=where is layer: seen.__setitem__("x", (i[0] if w else o).detach()))
        try:
            dead = torch.zeros(layer.cols, dtype=torch.bool)
            for b in sets.values():
                with torch.no_grad():
                    m(b)
                dead |= (seen["x"].reshape(-1, layer.cols) == 0).all(dim=0)
        finally:
            hook.remove()
        out += [(f"{name}._w_cache", r * layer.cols + int(j)) for j in torch.nonzero(dead).flatten() for r in range(layer.rows)]
    return out


def part_canaries(tmp: Path, per_tensor: int, secret_draws: int) -> tuple[list[dict], dict]:
    _, sealed, owner = sealed_loaded(tmp, "w8a8")
    qm = secquant.load(sealed, identity=owner.identity, verify_key=owner.verify_key)
    m = qm.module
    x, y = splits()["test_x"], splits()["test_y"]
    sets = {"public (old server canary: 4 uniform inputs, public seed 1234)":
            torch.rand((4, 1, 8, 8), generator=torch.Generator().manual_seed(1234))}
    info = {}
    for i in range(secret_draws):
        c = draw_canaries(qm.handle, m, seed=1000 + i)  # fixed seeds only so the bench can be rerun
        sets[f"secret draw {i + 1}"] = c.batch
        info[f"secret draw {i + 1}"] = {"canaries": c.count, "unit_coverage": c.covered / c.units}
    c = draw_canaries(qm.handle, m, seed=99)
    sets["attacker's own draw (same distribution, another seed)"] = c.batch
    info["attacker's own draw (same distribution, another seed)"] = {"canaries": c.count,
                                                                    "unit_coverage": c.covered / c.units}
    bounds, start = {}, 0
    for k, b in sets.items():
        bounds[k] = (start, start + len(b))
        start += len(b)
    batch = torch.cat(list(sets.values()))
    with torch.no_grad():
        ref = m(batch)
        clean = float((m(x).argmax(1) == y).float().mean())
    tensors = reachable_tensors(m)
    # a flip in anything a quantized layer's cache is computed from (codes, scales, zero points, codebooks)
    # is made visible by recomputing the cache, as ORT, which holds no such cache, would compute with it
    layers = {n: mod for n, mod in m.named_modules() if hasattr(mod, "refresh_derived")}
    owners = {name: layers[name.rpartition(".")[0]] for name in tensors
              if name.rpartition(".")[0] in layers and not name.endswith("._w_cache")}
    cands = candidate_flips(qm, per_tensor, random.Random(7))
    targeted = targeted_flips(m, sets)
    cands += sorted(set(targeted) - set(cands))
    log(f"canaries: {len(cands)} candidate flips, {len(batch)} canary inputs in {len(sets)} sets")
    stats = {k: {"silent": 0, "silent_over_1pt": 0, "max_silent_drop": 0.0, "worst": ""} for k in sets}
    public_silent: list[tuple[float, str, int]] = []
    t0 = time.perf_counter()
    def live(name: str) -> torch.Tensor:  # a cache is replaced (not updated) when recomputed: fetch it now
        return owners_of_cache[name]._w_cache if name in owners_of_cache else tensors[name]

    owners_of_cache = {name: layers[name.rpartition(".")[0]] for name in tensors if name.endswith("._w_cache")}
    for i, (name, e) in enumerate(cands):
        t = live(name)
        bit = damaging_bit(t)
        flip_tensor_bit(t, e, bit)
        if name in owners:
            owners[name].refresh_derived()
        with torch.no_grad():
            out = m(batch)
        silent = {k: outputs_match(ref[a:b], out[a:b]) for k, (a, b) in bounds.items()}
        if any(silent.values()):
            with torch.no_grad():
                drop = clean - float((m(x).argmax(1) == y).float().mean())
            for k, s in silent.items():
                if s:
                    st = stats[k]
                    st["silent"] += 1
                    st["silent_over_1pt"] += drop > 0.01
                    if drop > st["max_silent_drop"]:
                        st["max_silent_drop"], st["worst"] = drop, f"{name}[{e}] bit {bit}"
            if silent[next(iter(sets))] and drop > 0.01:
                public_silent.append((drop, name, e))
        flip_tensor_bit(t, e, bit)
        if name in owners:
            owners[name].refresh_derived()
        if i % 1000 == 999:
            log(f"  {i + 1}/{len(cands)} flips, {time.perf_counter() - t0:.0f} s")
    assert qm.check_integrity() == []
    rows = [emit("canaries", canary_set=k, candidate_flips=len(cands), clean_accuracy=clean,
                 **info.get(k, {"canaries": 4}), **v) for k, v in stats.items()]
    # the attack: the five flips silent on the public canary that hurt most, all at once
    public_silent.sort(reverse=True)
    chosen = public_silent[:5]
    for _, name, e in chosen:
        flip_tensor_bit(live(name), e, damaging_bit(live(name)))
        if name in owners:
            owners[name].refresh_derived()
    with torch.no_grad():
        out = m(batch)
        acc5 = float((m(x).argmax(1) == y).float().mean())
    caught = {k: not outputs_match(ref[a:b], out[a:b]) for k, (a, b) in bounds.items()}
    guard = sorted({c.name for c in qm.check_integrity()})
    attack = emit("canaries_five_flip_attack", flips=[f"{n}[{e}]" for _, n, e in chosen], accuracy=acc5,
                  clean_accuracy=clean, caught_by=caught, checksums_report=guard)
    return rows, attack


# -- 3. ONNX Runtime's own copy --------------------------------------------------------------------------

def part_ort(tmp: Path, flips: int) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from secquant.security import open_sealed
    from secquant.server import ServedModel

    art, sealed, owner = sealed_loaded(tmp, "w8a8", onnx=True)
    qm = secquant.load(sealed, identity=owner.identity, verify_key=owner.verify_key)
    opened = open_sealed(sealed, owner.identity, owner.verify_key, tmp / "ort-opened")
    from secquant.runtime import Session

    served = ServedModel(qm, Session(opened, threads=1, export=False))
    canaries, ref = served.canaries.batch, served._canary_out[0]
    x, y = splits()["test_x"], splits()["test_y"]
    model = onnx.load(str(opened / "model.onnx"))
    inits = [i for i in model.graph.initializer if i.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.INT8,
                                                                   onnx.TensorProto.UINT8)]
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = 1, 3

    def run(sess, batch):
        return torch.from_numpy(sess.run(None, {sess.get_inputs()[0].name: batch.numpy()})[0])

    base = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    clean = float((run(base, x).argmax(1) == y).float().mean())
    rng = random.Random(11)
    silent = silent_bad = caught = moved = 0
    max_silent = 0.0
    for _ in range(flips):
        init = rng.choice(inits)
        arr = onnx.numpy_helper.to_array(init).copy()
        e = rng.randrange(arr.size)
        bit = 30 if arr.dtype == np.float32 else 7
        flat = arr.reshape(-1).view(np.uint8)
        flat[e * arr.itemsize + bit // 8] ^= 1 << (bit % 8)
        bad = copy.deepcopy(model)
        for j, i2 in enumerate(bad.graph.initializer):
            if i2.name == init.name:
                bad.graph.initializer[j].CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
        sess = ort.InferenceSession(bad.SerializeToString(), so, providers=["CPUExecutionProvider"])
        drop = clean - float((run(sess, x).argmax(1) == y).float().mean())
        is_silent = outputs_match(ref, run(sess, canaries))
        moved += drop > 0.01
        if is_silent:
            silent += 1
            silent_bad += drop > 0.01
            max_silent = max(max_silent, drop)
        else:
            caught += drop > 0.01
    return emit("ort", model="builtin:digits w8a8, model.onnx", flips=flips, clean_accuracy=clean,
                canaries=served.canaries.count, moved_over_1pt=moved, moved_and_caught=caught, silent=silent,
                silent_over_1pt=silent_bad, max_silent_drop=max_silent)


# -- 4. cost on MiniLM ---------------------------------------------------------------------------------

def part_cost(tmp: Path, seconds: float, repeats: int) -> list[dict]:
    from secquant.server import open_served

    log("MiniLM w8a8: quantize, export, seal")
    art, sealed, owner = sealed_loaded(tmp, "w8a8", model="builtin:minilm", onnx=True)
    out = []
    texts = ["The quick brown fox jumps over the lazy dog.", "Secure inference keeps the weights sealed.",
             "How many requests per second can one server answer?", "A short one."] * 2
    for backend in ("onnxruntime", "pytorch"):
        t0 = time.perf_counter()
        served = open_served(sealed, owner.identity, owner.verify_key, backend=backend, threads=1)
        open_s = time.perf_counter() - t0
        g = served.guard

        def timed(fn, n=7):
            ts = []
            for _ in range(n):
                t = time.perf_counter()
                fn()
                ts.append(1000 * (time.perf_counter() - t))
            return statistics.median(ts)

        checksum_ms = timed(lambda: g.check() == [] or sys.exit("corrupted"))
        canary_ms = timed(served._canary_run)
        full_ms = timed(lambda: served.check() is None or sys.exit(served.corruption))
        # what the canaries cannot see: a flip in the embedding row of a token no canary contains moves only
        # the sentences with that token. Share of the 256 evaluation sentences such a flip could reach:
        from secquant.models.encoder import builtin_sentences

        seen_tokens = {t for b in served.canaries.batches for t in b["input_ids"][b["attention_mask"].bool()].tolist()}
        tok = served.qm.handle.adapter.tokenizer
        eval_sets = [set(tok(t, truncation=True, max_length=128)["input_ids"]) for t in builtin_sentences()[0]]
        share = {}
        for tokens in eval_sets:
            for t in tokens - seen_tokens:
                share[t] = share.get(t, 0) + 1
        row_tokens = {"canary_tokens": len(seen_tokens),
                      "worst_uncovered_token_share": max(share.values(), default=0) / len(eval_sets),
                      "worst_uncovered_token": tok.convert_ids_to_tokens(max(share, key=share.get)) if share else None,
                      "sentences_with_an_uncovered_token": sum(bool(ts - seen_tokens) for ts in eval_sets) / len(eval_sets)}
        row = {"backend": backend, "open_s": open_s, **row_tokens, "tensors": len(g.tensors), "groups": g.groups,
               "bytes_checked": sum(t.numel() * t.element_size() for t in reachable_tensors(served.qm.module).values()),
               "canaries": served.canaries.count, "sweep_batches": len(served._sweep), "checksum_ms": checksum_ms, "canary_ms": canary_ms,
               "full_check_ms": full_ms}
        if backend == "onnxruntime":
            rates = {"none": [], "every 1 s": []}
            for r in range(repeats):
                for mode in ("none", "every 1 s"):
                    stop = threading.Event()
                    checker = None
                    if mode != "none":
                        def loop():
                            while not stop.wait(1.0):
                                if served.check() is not None:
                                    raise SystemExit(served.corruption)
                        checker = threading.Thread(target=loop, daemon=True)
                        checker.start()
                    n, t_end = 0, time.perf_counter() + seconds
                    while time.perf_counter() < t_end:
                        served.embed(texts)
                        n += 1
                    stop.set()
                    if checker:
                        checker.join()
                    rates[mode].append(n * len(texts) / seconds)
                    log(f"  throughput run {r + 1} {mode}: {rates[mode][-1]:.1f} sentences/s")
            row.update({"throughput_no_check": statistics.median(rates["none"]),
                        "throughput_check_every_1s": statistics.median(rates["every 1 s"]),
                        "throughput_runs": rates, "batch": len(texts), "seconds_per_run": seconds})
            # each 'every 1 s' run right after a 'none' run: the ratio of each pair cancels the slow drift of the
            # other jobs on this shared machine; the median of the pairs is reported
            row["throughput_ratio"] = statistics.median(c / n for n, c in zip(rates["none"], rates["every 1 s"]))
        out.append(emit("cost", model="builtin:minilm w8a8 (sealed)", **row))
    return out


# -- report ----------------------------------------------------------------------------------------------

def pct(v: float) -> str:
    return f"{100 * v:.2f}"


def markdown(args, bar, canaries, attack, ort_row, cost, header: str) -> str:
    lines = ["## Integrity guard", "", header, ""]
    if bar:
        lines += ["### The bar: single-bit flips over every tensor of a sealed, loaded model", "",
                 f"builtin:digits w8a8 sealed then loaded with `secquant.load`; {bar['flips']} random flips (seed 15), "
                 f"each in a random tensor of the {bar['tensors']} the model holds (codes, scales, zero points, biases, "
                 "BatchNorm, activation-quantizer and smoothing tensors, dequantized-weight caches), bit 30 of a float or "
                 "the top bit of an integer; flipped in place, checked, undone.", "",
                 "| flips | moved held-out accuracy > 1 point | reported by `check_integrity()` | moved and reported "
                 "| moved, in the codes the old guard covered | worst drop |", "|---:|---:|---:|---:|---:|---|",
                 f"| {bar['flips']} | {bar['moved_over_1pt']} | {bar['reported']} | {bar['moved_and_reported']} | "
                 f"{bar['moved_in_codes_old_guard_scope']} | {pct(bar['worst_drop'])} points ({bar['worst_tensor']}) |", ""]
    if canaries:
        lines += ["### Canaries: flips silent on them, and what they cost in accuracy", "",
                 f"The PyTorch module stands in for ONNX Runtime's copy of the weights (no checksum reads that copy). "
                 f"Candidate flips: {canaries[0]['candidate_flips']} (the attacker's targeted search: every element of "
                 "a Linear layer's cached weight whose input unit is 0 on every input of one of the canary sets below; "
                 "and every element of each tensor up to "
                 f"{args.per_tensor} elements, {args.per_tensor} random ones of larger tensors, the dequantized-weight "
                 "caches the PyTorch forward reads included; after a flip in codes, scales or zero points the cache is "
                 "recomputed from them, as ORT would compute with them), at the damaging bit. A flip is *silent* on a canary set when "
                 "every output stays within 1e-5 of the largest reference output. For each silent flip the held-out "
                 f"accuracy drop (899 samples, clean {pct(canaries[0]['clean_accuracy'])}%) is measured.", "",
                 "| canary set | inputs | unit coverage | silent flips | silent and > 1 point | worst silent drop (points) |",
                 "|---|---:|---:|---:|---:|---|"]
        for r in canaries:
            cov = f"{100 * r['unit_coverage']:.1f}%" if "unit_coverage" in r else "-"
            lines.append(f"| {r['canary_set']} | {r['canaries']} | {cov} | {r['silent']} | {r['silent_over_1pt']} | "
                         f"{pct(r['max_silent_drop'])} ({r['worst'] or '-'}) |")
        caught = ", ".join(f"{k}: {'caught' if v else 'silent'}" for k, v in attack["caught_by"].items())
        lines += ["", f"The issue's attack, replayed: the {len(attack['flips'])} flips silent on the public canary that "
                  f"hurt most, made together, take accuracy from {pct(attack['clean_accuracy'])}% to "
                  f"{pct(attack['accuracy'])}%. Canary sets: {caught}. The checksums report "
                  f"{', '.join(attack['checksums_report']) or 'nothing'}.", ""]
    if ort_row:
        lines += ["### ONNX Runtime's copy", "",
                  f"{ort_row['flips']} random flips in the initializers of the exported model.onnx (bit 30 of a float, "
                  "bit 7 of an 8-bit integer), each loaded into a new ORT session; the server's secret canaries "
                  f"({ort_row['canaries']} inputs) run through it. Clean accuracy on ORT "
                  f"{pct(ort_row['clean_accuracy'])}%.", "",
                  "| flips | moved accuracy > 1 point | of those caught by the canaries | silent flips | "
                  "silent and > 1 point | worst silent drop (points) |", "|---:|---:|---:|---:|---:|---:|",
                  f"| {ort_row['flips']} | {ort_row['moved_over_1pt']} | {ort_row['moved_and_caught']} | "
                  f"{ort_row['silent']} | {ort_row['silent_over_1pt']} | {pct(ort_row['max_silent_drop'])} |", ""]
    if cost:
        lines += ["### Cost on MiniLM w8a8", "",
                  "builtin:minilm w8a8 quantized, exported, sealed, opened with `open_served` (1 ORT thread); medians "
                  "of 7. The checksums cover every tensor of the PyTorch module (the reference copy; with PyTorch "
                  "serving, the copy that answers); the canaries run through the serving backend.", "",
                  "| backend | tensors | MB checked | canaries | checksums ms | canary run ms | full check ms |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in cost:
            lines.append(f"| {r['backend']} | {r['tensors']} | {r['bytes_checked'] / 1e6:.1f} | {r['canaries']} | "
                         f"{r['checksum_ms']:.0f} | {r['canary_ms']:.0f} | {r['full_check_ms']:.0f} |")
        t = next(r for r in cost if r["backend"] == "onnxruntime")
        lines += ["", f"Embedding rows: the {t['canaries']} canary sentences and the two rows of frequent tokens hold "
                  f"{t['canary_tokens']} distinct tokens of the 30,522 in the vocabulary. A flip in ORT's copy of the "
                  "embedding row of a token they do not hold moves only the sentences that contain it: the most "
                  f"frequent such token (`{t['worst_uncovered_token']}`) is in {100 * t['worst_uncovered_token_share']:.1f}% "
                  "of the 256 evaluation sentences. So with ORT serving an encoder, each check also runs the next of "
                  f"{t['sweep_batches']} batches of a secret sweep over the whole vocabulary (2 rows of 126 tokens; "
                  "included in the full-check time): every row is read within "
                  f"{t['sweep_batches']} checks. With PyTorch serving, the checksums cover every row at every check."]
        lines += ["", f"Serving throughput (ORT, batches of {t['batch']} sentences, back to back in one thread, "
                  f"{t['seconds_per_run']:.0f} s per run, runs alternated, medians of {len(t['throughput_runs']['none'])}): "
                  f"**{t['throughput_no_check']:.1f}** sentences/s with no check, "
                  f"**{t['throughput_check_every_1s']:.1f}** with a full check every second "
                  f"(median ratio of the pairs of runs: {t['throughput_ratio']:.3f}). Runs: "
                  f"{json.dumps({k: [round(v) for v in r] for k, r in t['throughput_runs'].items()})}.", ""]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="few flips, short runs (smoke test only)")
    ap.add_argument("--bar-flips", type=int, default=500)
    ap.add_argument("--per-tensor", type=int, default=2000)
    ap.add_argument("--secret-draws", type=int, default=3)
    ap.add_argument("--ort-flips", type=int, default=300)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-minilm", action="store_true")
    ap.add_argument("--parts", default="bar,canaries,ort,cost", help="comma-separated subset to run")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="JSON lines of an earlier run (its stdout): the parts not run now are taken from it")
    ap.add_argument("--write-results", action="store_true", help="put the section into bench/RESULTS.md")
    args = ap.parse_args()
    if args.quick:
        args.bar_flips, args.per_tensor, args.secret_draws, args.ort_flips = 40, 60, 1, 20
        args.seconds, args.repeats = 3.0, 1
    t0, cpu0, load0 = time.time(), cpu_counters(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="secquant-bench-integrity-") as td:
        tmp = Path(td)
        parts = set(args.parts.split(","))
        bar = canaries = attack = ort_row = None
        if "bar" in parts:
            log("part 1: the bar")
            bar = part_bar(tmp, args.bar_flips)
        if "canaries" in parts:
            log("part 2: canaries (PyTorch)")
            canaries, attack = part_canaries(tmp, args.per_tensor, args.secret_draws)
        if "ort" in parts and args.ort_flips:
            log("part 3: canaries (ONNX Runtime)")
            ort_row = part_ort(tmp, args.ort_flips)
        cost = [] if args.skip_minilm or "cost" not in parts else part_cost(tmp, args.seconds, args.repeats)
    if args.reuse:  # parts not run now: from an earlier run's JSON lines
        old = [json.loads(ln) for ln in args.reuse.read_text().splitlines() if ln.startswith("{")]
        bar = bar or next((r for r in old if r["part"] == "bar"), None)
        if canaries is None:
            canaries = [r for r in old if r["part"] == "canaries"] or None
            attack = next((r for r in old if r["part"] == "canaries_five_flip_attack"), None)
        ort_row = ort_row or next((r for r in old if r["part"] == "ort"), None)
        cost = cost or [r for r in old if r["part"] == "cost"]
    total = time.time() - t0
    cmd = "python bench/integrity.py " + " ".join(sys.argv[1:])
    header = (f"- Command: `{cmd.strip()}` (repository root)\n"
              f"- Date: {dt.datetime.now(dt.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n"
              f"- Machine: {machine_line(1)}\n- Source: {source_fingerprint()}\n"
              f"- Runtime: {total:.0f} s; load average at start / end {load0:.2f} / {os.getloadavg()[0]:.2f}; "
              f"{other_load(cpu0, total)}")
    if args.reuse:
        reused = sorted({"bar", "canaries", "ort", "cost"} - set(args.parts.split(",")))
        header += (f"\n- Parts {', '.join(reused)}: from earlier runs on the same machine and day (their JSON lines, "
                   f"`--reuse {args.reuse.name}`)")
    md = markdown(args, bar, canaries, attack, ort_row, cost, header)
    if args.write_results:
        replace_section(ROOT / "bench" / "RESULTS.md", "Integrity guard", md)
        log("wrote the Integrity guard section of bench/RESULTS.md")
    else:
        print(md, file=sys.stderr)


if __name__ == "__main__":
    main()
