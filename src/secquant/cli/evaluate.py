"""CLI commands that measure artifacts: eval, demo (the main job, with its report)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from .common import RichProgress, err, existing, factory_option, out, user_errors, weights_option

app = typer.Typer()


@app.command("eval")
@user_errors
def eval_(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    against: Optional[str] = typer.Option(None, "--against", help="float model to compare with: needed unless the "
                                                                  "artifact was made from a built-in (nothing a "
                                                                  "manifest names is ever imported or opened)"),
    data: Optional[Path] = typer.Option(None, "--data", help="evaluation data (default: the model's built-in held-out data)"),
    weights: Optional[Path] = weights_option("float weights of the factory model the artifact was made from "
                                             "(with --factory or --against)"),
    factory: Optional[str] = factory_option("confirm the package.module:factory a factory-built artifact names "
                                            "(also the float reference, with --weights)"),
    batch_size: int = typer.Option(32, "--batch-size", min=1),
    runtime: str = typer.Option("torch", "--runtime", help="torch (eager PyTorch) or onnx (ONNX Runtime; exports "
                                                           "model.onnx into the artifact if missing)"),
    threads: int = typer.Option(2, "--threads", min=1, help="ONNX Runtime intra-op threads"),
) -> None:
    """Evaluate an artifact against its float model; print one JSON object."""
    from ..api import evaluate, load
    from ..runtime.backend import backend_class

    backend_class(runtime)  # bad arguments fail before anything loads
    w, data_file = existing(weights, "--weights"), existing(data, "--data")
    qm = load(artifact, factory=factory, allow_unsealed=True)  # naming a directory is the opt-in
    with RichProgress() as prog:
        res = evaluate(qm, against=against or factory, data=data_file, weights=w, batch_size=batch_size,
                       progress=prog, runtime=runtime, threads=threads)
    sys.stdout.write(json.dumps(res) + "\n")

@app.command()
@user_errors
def demo(
    out_dir: Path = typer.Option(Path("secquant-demo"), "--out", help="where to write artifacts and the report"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    model: Optional[list[str]] = typer.Option(None, "--model", help="restrict to these built-ins"),
    preset: Optional[list[str]] = typer.Option(None, "--preset", help="restrict to these presets"),
    privacy: bool = typer.Option(True, "--privacy/--no-privacy", help="add the privacy part: DP calibration, "
                                                                       "PII masking, membership-inference audit"),
    private_inference: bool = typer.Option(True, "--private-inference/--no-private-inference",
                                           help="run digits-w8a8 secret-shared among 3 local parties (MPyC)"),
) -> None:
    """Quantize the built-in models with several presets, evaluate them (PyTorch and ONNX Runtime) and write a report."""
    from ..demo import run_demo

    with RichProgress() as prog:
        report = run_demo(out_dir, overwrite, model or None, preset or None, progress=prog,
                          log=lambda s: err.print(s, highlight=False, soft_wrap=True), privacy=privacy,
                          private_inference=private_inference)
    onnx_ms = {(s["model"], s["recipe"]): s["latency_ms"] for s in report["speed"]}
    t = Table(title=f"secquant demo ({out_dir}/report.html)")
    for c in ["model", "preset", "data", "metric", "value", "fp32", "size ratio", "ORT ms", "fp32 torch ms"]:
        t.add_column(c)
    for r in report["results"]:
        ort_ms = onnx_ms.get((r["model"], r["recipe"]))
        t.add_row(r["model"], r["recipe"], r["calibration_data"], r["metric"], f"{r['value']:.4f}",
                  f"{r['float_value']:.4f}", f"{r['size_ratio']:.3f}", f"{ort_ms:.1f}" if ort_ms else "",
                  f"{r['float_latency_ms']:.1f}")
    out.print(t)
