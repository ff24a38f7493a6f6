"""The main job on the built-in defaults: quantize both built-ins with several presets,
evaluate each artifact (re-loaded from disk), write report.json / report.html."""

from __future__ import annotations

import datetime as _dt
import json
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

DEMO_MODELS = ["builtin:digits", "builtin:minilm"]
DEMO_PRESETS = ["w8a16", "w8a8", "w8a8-dynamic", "w4a16", "w4a8-dynamic"]


def run_demo(out: Path, overwrite: bool = False, models: list[str] | None = None, presets: list[str] | None = None,
             progress: Progress = _no_progress, log: Callable[[str], None] = print) -> dict[str, Any]:
    models = models or DEMO_MODELS
    presets = presets or DEMO_PRESETS
    for p in presets:
        get_preset(p)  # fail on a typo before any work
    results = []
    with atomic_dir(Path(out), overwrite) as tmp:
        for spec in models:
            handle = load_model(spec)
            for preset in presets:
                name = f"{spec.split(':')[-1]}-{preset}"
                t0 = time.perf_counter()
                quantize(handle, preset, out=tmp / "artifacts" / name, progress=progress)
                dt = time.perf_counter() - t0
                qm = load(tmp / "artifacts" / name, allow_unsealed=True)  # evaluate what is on disk, not what is in memory
                r = evaluate(qm, against=handle.module, progress=progress)
                r["artifact"] = f"artifacts/{name}"
                r["model"] = spec
                r["quantize_s"] = dt
                results.append(r)
                log(f"{spec:16s} {preset:13s} {r['metric']}={r['value']:.4f} (fp32 {r['float_value']:.4f}) "
                    f"size {r['size_ratio']:.3f}x  quantized in {dt:.1f}s")
        report = {
            "secquant_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "results": results,
        }
        (tmp / "report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
        (tmp / "report.html").write_text(render_html(report), encoding="utf-8")
    return report
