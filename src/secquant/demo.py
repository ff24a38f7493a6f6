"""The main job on the built-in defaults: quantize both built-ins with several presets,
evaluate each artifact (re-loaded from disk) in PyTorch and on ONNX Runtime, calibrate one
with differential privacy, mask a PII corpus, audit membership leakage, and write
report.json / report.html."""

from __future__ import annotations

import datetime as _dt
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ._version import __version__
from .api import Progress, _no_progress, evaluate, load, quantize
from .artifact import atomic_dir
from .models import load_model
from .recipes import get_preset
from .report import render_html
from .report.sections import privacy_ledger_section, security_section, speed_section

DEMO_MODELS = ["builtin:digits", "builtin:minilm"]
DEMO_PRESETS = ["w8a16", "w8a8", "w8a8-dynamic", "w4a16", "w4a8-dynamic"]


DP_EPSILON = 1.0
PRIVATE_SAMPLES = 4  # secret-shared inference costs seconds per image: a handful keeps `make demo` short


def _quantize_and_evaluate(handle, spec: str, preset: str, art: Path, progress: Progress, label: str | None = None,
                           **kw) -> tuple[dict[str, Any], Any]:
    t0 = time.perf_counter()
    quantize(handle, preset, out=art, progress=progress, **kw)
    dt = time.perf_counter() - t0
    qm = load(art, allow_unsealed=True)  # evaluate what is on disk, not what is in memory
    r = evaluate(qm, against=handle.module, progress=progress)
    r.update(artifact=f"artifacts/{art.name}", model=spec, quantize_s=dt,
             calibration_data=qm.manifest.calibration.data, calibration_samples=qm.manifest.calibration.num_samples,
             privacy=qm.manifest.privacy.entries)
    if label:
        r["recipe"] = label
    return r, qm


def _speed_row(r: dict[str, Any], handle, qm, progress: Progress) -> dict[str, Any]:
    s = evaluate(qm, against=handle.module, runtime="onnx", threads=2, progress=progress)
    return {"model": r["model"], "recipe": r["recipe"], "runtime": s["runtime"], "value": s["value"],
            "float_value": s["float_value"], "latency_ms": s["latency_ms"], "float_latency_ms": s["float_latency_ms"],
            "speedup": s["float_latency_ms"] / s["latency_ms"], "onnx_size_bytes": s["onnx_size_bytes"]}


def _masking_summary() -> dict[str, Any]:
    from .privacy.masking import mask_texts
    from .audits.pii_corpus import make_corpus

    records, _ = make_corpus(200, seed=0)
    return mask_texts([r["text"] for r in records] + [r["notes"] for r in records])[1]


def run_demo(out: Path, overwrite: bool = False, models: list[str] | None = None, presets: list[str] | None = None,
             progress: Progress = _no_progress, log: Callable[[str], None] = print,
             privacy: bool = True, private_inference: bool = True) -> dict[str, Any]:
    models = models or DEMO_MODELS
    presets = presets or DEMO_PRESETS
    for p in presets:
        get_preset(p)  # fail on a typo before any work
    results, speed = [], []

    def show(r):
        log(f"{r['model']:16s} {r['recipe']:13s} {r['metric']}={r['value']:.4f} (fp32 {r['float_value']:.4f}) "
            f"size {r['size_ratio']:.3f}x  quantized in {r['quantize_s']:.1f}s  data: {r['calibration_data']}")

    with atomic_dir(Path(out), overwrite) as tmp, tempfile.TemporaryDirectory(prefix="secquant-demo-") as scratch:
        for spec in models:
            handle = load_model(spec)
            for preset in presets:
                art = tmp / "artifacts" / f"{spec.split(':')[-1]}-{preset}"
                r, qm = _quantize_and_evaluate(handle, spec, preset, art, progress)
                results.append(r)
                show(r)
                speed.append(_speed_row(r, handle, qm, progress))
                log(f"{'':16s} {'':13s} on ONNX Runtime: {speed[-1]['latency_ms']:.1f} ms per batch, "
                    f"{speed[-1]['speedup']:.2f}x fp32 PyTorch, {r['metric']}={speed[-1]['value']:.4f}")
            if privacy and "w8a8" in presets:  # the same preset, calibrated with differential privacy
                calib = _private_calibration_file(spec, handle, Path(scratch))
                r, _ = _quantize_and_evaluate(handle, spec, "w8a8", tmp / "artifacts" / f"{spec.split(':')[-1]}-w8a8-dp",
                                           progress, label=f"w8a8 (DP eps={DP_EPSILON:g})", calib=calib,
                                           dp_epsilon=DP_EPSILON)
                results.append(r)
                show(r)
        report = {
            "secquant_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "results": results,
            "speed": speed,
        }
        sections = [speed_section(speed)]
        if "builtin:digits" in models and "w8a8" in presets:
            log("sealing digits-w8a8, opening it, checking integrity, embedding a watermark")
            report["security"] = _security(tmp, Path(scratch), load_model("builtin:digits"))
            sections.append(security_section(report["security"]))
        if privacy:
            log("masking a seeded PII corpus (secquant mask)")
            report["masking"] = _masking_summary()
            audit_html = None
            if "builtin:digits" in models and "w8a8" in presets:
                from .audits.membership import audit_membership, privacy_section

                log("membership-inference audit of builtin:digits fp32 vs w8a8 (8 shadow models)")
                audit = audit_membership("builtin:digits", [tmp / "artifacts" / "digits-w8a8"], shadows=8,
                                         progress=progress)
                report["membership_audit"] = {k: v for k, v in audit.items() if k != "roc"}
                audit_html = privacy_section(audit)["html"]
            sections.append(privacy_ledger_section(results, report["masking"], audit_html))
        if private_inference and "builtin:digits" in models and "w8a8" in presets:
            from .report.sections import private_inference_section
            from .runtime.private import private_evaluate

            log(f"private inference: digits-w8a8 secret-shared among 3 local parties ({PRIVATE_SAMPLES} images)")
            report["private_inference"] = private_evaluate(tmp / "artifacts" / "digits-w8a8", samples=PRIVATE_SAMPLES)
            sections.append(private_inference_section(report["private_inference"]))
        report["sections"] = sections
        (tmp / "report.json").write_text(json.dumps({k: v for k, v in report.items() if k != "sections"}, indent=2)
                                         + "\n", encoding="utf-8")
        (tmp / "report.html").write_text(render_html(report), encoding="utf-8")
    return report


def _private_calibration_file(spec: str, handle, scratch: Path) -> Path:
    """The model's built-in calibration set as a file, standing in for a user's private data."""
    return handle.adapter.write_builtin_calibration(scratch, 256)


def _security(tmp: Path, scratch: Path, handle) -> dict[str, Any]:
    """Seal the digits w8a8 artifact to a demo key, load it back verified, exercise the integrity guard
    and the watermark; the keys stay in a scratch directory (only the public recipient is reported)."""
    from .models.digits import splits
    from .security import keygen, seal
    from .security.watermark import embed_watermark, keygen as wm_keygen, verify_watermark

    owner = keygen(scratch / "demo-owner")
    recipient = owner.recipient.read_text().strip()
    sealed = seal(tmp / "artifacts" / "digits-w8a8", [recipient], owner.sign_key, tmp / "digits-w8a8.age")
    qm = load(sealed, identity=owner.identity, verify_key=owner.verify_key)  # decrypts, verifies, checks integrity
    x, y = splits()["test_x"], splits()["test_y"]

    def acc(m) -> float:
        with torch.no_grad():
            return float((m(x).argmax(1) == y).float().mean())

    clean = acc(qm.module)
    layer = qm.integrity.layers["features.3"]
    layer.qweight.view(-1)[7] ^= 0x80  # one high bit flipped in memory, as a fault attack would
    layer._w_cache = None
    flipped = acc(qm.module)
    found = qm.check_integrity(repair=True)
    repaired = acc(qm.module)
    wm_key = wm_keygen(scratch / "demo-owner.wm")
    marked = quantize(handle, "w8a8")
    unmarked_acc = acc(marked.module)
    embed_watermark(marked.module, handle.module, wm_key)
    v = verify_watermark(marked, wm_key)  # against the float model marked.handle holds
    other = verify_watermark(marked, wm_keygen(scratch / "other.wm"))
    return {
        "sealed file": f"{sealed.name}, {sealed.stat().st_size} bytes (age, X25519)",
        "recipients": recipient,
        "signature": "verified (OpenSSF model-signing, ECDSA P-256) before any tensor was used",
        "integrity check on load": f"intact: {len(qm.integrity.layers)} layers, "
                                   f"{qm.integrity.groups} groups",
        "one bit flipped in memory": f"detected ({len(found)} group); accuracy {clean:.4f} -> {flipped:.4f} "
                                     f"-> {repaired:.4f} after zeroing the group",
        "watermark (owner key)": f"{'detected' if v.detected else 'not detected'}: z = {v.z:.1f}, p <= {v.p_value:.3g} "
                                 "(false-positive bound)",
        "watermark (another key)": f"{'detected' if other.detected else 'not detected'}: p = {other.p_value:.3g}",
        "watermark accuracy cost": f"{unmarked_acc:.4f} -> {acc(marked.module):.4f}",
    }
