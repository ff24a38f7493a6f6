"""PII masking benchmark: recall and partial leaks per type on two corpora, false positives on clean text, operators.

    .venv/bin/python bench/masking.py [--holdout 600] [--records 1000] [--md results_masking.md]
    .venv/bin/python bench/masking.py --detection-only   # with PYTHONPATH at an older secquant: its detector

Corpora:
- held-out (`audits/pii_yardstick.py`, loaded here by file path so that it runs against any secquant version; it
  imports nothing from secquant, Presidio or phonenumbers): reserved/private/IDN e-mail domains, unassigned and
  formatted phone numbers, all-digit Dutch IBANs, 9 card brands, IPv6, ... Scored on the spans the masker replaces:
  found (one span of the type covers the value), in clear (nothing of it replaced), partial (some letters or digits
  of it left beside the mask).
- the old generator (`audits/pii_corpus.py`): values its validators accept, with checksum-failing distractors.
- clean text: the 512 built-in sentences and the corpora's filler sentences (no PII): every span is a false positive.
Prints one JSON line per result; --md writes the markdown section for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _yardstick():
    path = HERE.parent / "src" / "secquant" / "audits" / "pii_yardstick.py"
    spec = importlib.util.spec_from_file_location("pii_yardstick_standalone", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


def _spans(masker, text: str) -> list[tuple[int, int, str]]:
    return [(r.start, r.end, r.entity_type) for r in masker.analyze(text)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--holdout", type=int, default=600, help="records of the held-out corpus")
    ap.add_argument("--holdout-seed", type=int, default=20261128)
    ap.add_argument("--records", type=int, default=1000, help="records of the old generator's corpus")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--detection-only", action="store_true", help="skip the file/operator part (older APIs)")
    ap.add_argument("--md", type=Path, default=None, help="write a markdown section")
    args = ap.parse_args()

    import secquant
    from secquant.models.encoder import builtin_sentences
    from secquant.audits import pii_corpus
    from secquant.privacy.masking import STRUCTURED_ENTITIES, Masker

    ys = _yardstick()
    started = time.perf_counter()
    t0 = time.perf_counter()
    m = Masker()
    build_s = time.perf_counter() - t0
    out: dict = {"secquant": str(Path(secquant.__file__).parent), "engine_build_s": round(build_s, 2)}

    # held-out corpus
    records, planted = ys.make_holdout(args.holdout, seed=args.holdout_seed)
    t0 = time.perf_counter()
    replaced = {(i, f): _spans(m, rec[f]) for i, rec in enumerate(records) for f in ("text", "notes")}
    analyze_s = time.perf_counter() - t0
    stats = ys.score_masking(planted, replaced)
    for t, s in stats.items():
        print(json.dumps({"bench": "masking_holdout", "type": t, **s}, ensure_ascii=False))
    by_variant: dict[tuple[str, str], list[int]] = {}
    for p in planted:
        hit = any(t == p.entity_type and a <= p.start and b >= p.end for a, b, t in replaced[(p.record, p.field)])
        v = by_variant.setdefault((p.entity_type, p.variant.split("/")[0]), [0, 0])
        v[0] += 1
        v[1] += hit
    weak = {f"{t} {v}": f"{h}/{n}" for (t, v), (n, h) in sorted(by_variant.items()) if h < n}
    print(json.dumps({"bench": "masking_holdout_variants_below_1", **weak}))
    by_loc: dict = {}
    for p in planted:
        by_loc.setdefault((p.record, p.field), []).append(p)
    holdout_fp = Counter(t for loc, d in replaced.items() for a, b, t in d
                         if not any(a < p.end and b > p.start for p in by_loc.get(loc, [])))
    print(json.dumps({"bench": "masking_holdout_fp", "records": len(records), "analyze_s": round(analyze_s, 2),
                      "spans_outside_planted": dict(holdout_fp)}))
    out["holdout"] = {"records": len(records), "planted": len(planted), "stats": stats, "weak_variants": weak,
                      "fp": dict(holdout_fp), "analyze_s": analyze_s}

    # the old generator's corpus
    old_records, old_planted = pii_corpus.make_corpus(args.records, seed=args.seed)
    found = {(i, f): _spans(m, rec[f]) for i, rec in enumerate(old_records) for f in ("text", "notes")}
    old_stats = pii_corpus.score_detection(old_planted, found, STRUCTURED_ENTITIES)
    old_partial = ys.score_masking([ys.Plant(p.record, p.field, p.start, p.end, p.entity_type, p.value, "")
                                    for p in old_planted], found, STRUCTURED_ENTITIES)
    for t in STRUCTURED_ENTITIES:
        row = {**old_stats[t], "in_clear": old_partial[t]["in_clear"], "partial": old_partial[t]["partial"]}
        print(json.dumps({"bench": "masking_old_corpus", "type": t, **row}))
        old_stats[t] = row
    out["old"] = {"records": len(old_records), "planted": len(old_planted), "stats": old_stats}

    # clean text
    ev, cal = builtin_sentences()
    clean = {"built-in sentences": ev + cal, "filler sentences": list(pii_corpus.FILLER) + list(ys.FILLER)}
    out["clean"] = {}
    for name, texts in clean.items():
        fp = ys.false_positives(texts, [_spans(m, s) for s in texts])
        print(json.dumps({"bench": "masking_clean_fp", "set": name, **fp}, ensure_ascii=False))
        out["clean"][name] = fp

    # operators, end to end on the held-out records
    out["operators"] = {}
    if not args.detection_only:
        from pyrage import x25519

        from secquant.privacy.masking import mask_file, unmask_file

        key = os.urandom(32)
        structured = [p for p in planted if p.entity_type in STRUCTURED_ENTITIES]
        with tempfile.TemporaryDirectory() as td:
            src = Path(td) / "holdout.jsonl"
            src.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
            ident = x25519.Identity.generate()
            (Path(td) / "id.key").write_text(f"{ident}\n")
            for op in ("tag", "mask", "hash", "surrogate"):
                dst = Path(td) / f"out-{op}.jsonl"
                t0 = time.perf_counter()
                s = mask_file(src, dst, operators=[f"default={op}"], key=key, recipients=[str(ident.to_public())])
                dt = time.perf_counter() - t0
                masked = [json.loads(x) for x in dst.read_text(encoding="utf-8").splitlines()]
                left = sum(p.value in masked[p.record][p.field] for p in structured)
                t0 = time.perf_counter()
                unmask_file(dst, Path(td) / f"back-{op}.jsonl", Path(td) / "id.key")
                undo_s = time.perf_counter() - t0
                back = [json.loads(x) for x in (Path(td) / f"back-{op}.jsonl").read_text().splitlines()]
                row = {"values_left_in_clear": left, "seconds": round(dt, 2),
                       "records_per_s": round(len(records) / dt, 1), "unmask_s": round(undo_s, 2),
                       "round_trip_exact": back == records, "found": s["total_found"],
                       "masked_without_passing_check": s["masked_without_passing_check"]}
                print(json.dumps({"bench": "masking_file", "operator": op, **row}))
                out["operators"][op] = row
    out["total_s"] = time.perf_counter() - started
    if args.md:
        args.md.write_text(_markdown(args, out, STRUCTURED_ENTITIES), encoding="utf-8")


def _r(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _markdown(args, out: dict, types) -> str:
    load = os.getloadavg()
    cmd = (f"PYTHONPATH=src .venv/bin/python bench/masking.py --holdout {args.holdout} --records {args.records}"
           + (" --detection-only" if args.detection_only else "") + (f" --md {args.md}" if args.md else ""))
    h = out["holdout"]
    lines = [
        "## PII masking (`secquant mask`)", "",
        f"Command: `{cmd}`  ",
        f"Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; {platform.machine()}, {os.cpu_count()} CPUs, "
        f"Python {sys.version.split()[0]}; load average at the end {load[0]:.1f}/{load[1]:.1f}/{load[2]:.1f} (shared "
        f"2-core machine: times are inflated); total {out['total_s']:.0f} s.", "",
        "Bar: recall >= 0.99 on every structured type, with no value left in clear or in part. Scored on the spans "
        "the masker replaces: *found* = one span of the right type covers the value; *in clear* = none of its "
        "letters or digits replaced; *partial* = some of them left beside the mask (a '+1 ' prefix, an extension).", "",
        f"### Held-out corpus (`audits/pii_yardstick.py`, {h['records']} records, seed {args.holdout_seed}, "
        f"{h['planted']} values)", "",
        "Written apart from the masker (imports nothing from secquant, Presidio or phonenumbers): e-mail at reserved "
        "and private domains (.test, .example, .invalid, .localhost, .internal, .corp, .lan, .home.arpa), IDN and "
        "punycode, subdomains, plus-addressing, quoted local parts; phone numbers in unassigned and fictional ranges, "
        "E.164 with and without '+', national formats of 12 countries with spaces, dashes, dots, slashes, brackets, "
        "extensions; IBANs of 17 countries incl. all-digit Dutch and British bank codes, grouped or not, upper or "
        "lower case; Luhn-valid cards of 11 brands and lengths 13-19; IPv4, IPv6; SSNs, NINOs, NIRs, dates of birth.",
        "",
        "| type | planted | found | recall | in clear | partial |", "|---|---:|---:|---:|---:|---:|",
    ]
    for t in types:
        s = h["stats"][t]
        lines.append(f"| {t} | {s['planted']} | {s['found']} | {_r(s['recall'])} | {s['in_clear']} | {s['partial']} |")
    weak = ", ".join(f"{k} {v}" for k, v in h["weak_variants"].items()) or "none"
    lines += ["", f"Variants below recall 1: {weak}. Spans outside any planted value (false positives in the "
              f"records' filler sentences): {sum(h['fp'].values())}. Detection: {h['records']} records in "
              f"{h['analyze_s']:.1f} s.", ""]
    o = out["old"]
    lines += [f"### The old generator (`audits/pii_corpus.py`, {o['records']} records, {o['planted']} values)", "",
              "Plants only values its validators accept, plus distractors that fail a checksum (16-digit vouchers "
              "failing Luhn, IBANs with wrong check digits, NIR-shaped numbers with a wrong key). Those distractors "
              "are now masked on purpose (a check scores a match, it does not let it through): they are the "
              "'false positives' below, not clean text.", "",
              "| type | planted | found | recall | in clear | partial | masked distractors / other spans |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for t in types:
        s = o["stats"][t]
        lines.append(f"| {t} | {s['planted']} | {s['tp']} | {_r(s['recall'])} | {s['in_clear']} | {s['partial']} | "
                     f"{s['fp']} |")
    lines += ["", "### False positives on clean text (no PII)", "", "| text | texts | texts with a span | spans |",
              "|---|---:|---:|---:|"]
    for name, fp in out["clean"].items():
        lines.append(f"| {name} | {fp['texts']} | {fp['texts_flagged']} | {fp['spans']} |")
    ex = [e for fp in out["clean"].values() for e in fp["examples"]][:5]
    lines += ["", "Examples: " + (", ".join(f"{t} {v!r}" for t, v in ex) if ex else "none."), ""]
    if out["operators"]:
        lines += ["### Operators, end to end (`mask_file` on the held-out JSONL, reverse table to one age recipient, "
                  "then `unmask_file`)", "",
                  "| operator | planted values left in output | seconds | records/s | unmask s | restored exactly |",
                  "|---|---:|---:|---:|---:|---|"]
        for op, r in out["operators"].items():
            lines.append(f"| {op} | {r['values_left_in_clear']} | {r['seconds']} | {r['records_per_s']} | "
                         f"{r['unmask_s']} | {'yes' if r['round_trip_exact'] else 'NO'} |")
        lines.append("")
    lines.append(f"Building the engine (imports, spaCy blank pipeline): {out['engine_build_s']:.1f} s.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
