"""CLI commands: export (artifact -> ONNX for ONNX Runtime)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import (err, factory_option, out, parse_sample_dtype, parse_sample_shape, sample_dtype_option,
                     sample_shape_option, user_errors)

app = typer.Typer()


@app.command()
@user_errors
def export(
    artifact: Path = typer.Argument(..., help="artifact directory (model.onnx is added to it)"),
    fmt: str = typer.Option("onnx", "--format", help="export format (onnx)"),
    strict: bool = typer.Option(False, "--strict", help="fail, naming the layer, instead of falling back to "
                                                         "dequantized float weights for layers ORT cannot run"),
    external_data_threshold: int = typer.Option(2**31 - 1, "--external-data-threshold", min=1,
                                                help="bytes of tensors above which ONNX external data is used"),
    accuracy_level: int = typer.Option(0, "--accuracy-level", min=0, max=4,
                                       help="MatMulNBits accuracy_level (0: float activations as in PyTorch)"),
    factory: Optional[str] = factory_option(),
    sample_shape: Optional[str] = sample_shape_option("the input of one sample, without the batch dimension, "
                                                      "to trace with (default: the one the manifest records)"),
    sample_dtype: Optional[str] = sample_dtype_option("the input dtype to trace with: float32, int64 or int32 "
                                                      "(default: the one the manifest records)"),
) -> None:
    """Export an artifact to ONNX (integer kernels for ONNX Runtime) and register it in the manifest."""
    from ..errors import SecquantError
    from ..runtime import ExportFallbackWarning, export_info, export_onnx

    if fmt != "onnx":
        raise SecquantError(f"unknown --format {fmt!r}: the supported format is onnx")
    if not artifact.is_dir():
        raise SecquantError(f"{artifact} is not an artifact directory")
    shape, dtype = parse_sample_shape(sample_shape), parse_sample_dtype(sample_dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportFallbackWarning)
        path = export_onnx(artifact, strict=strict, external_data_threshold=external_data_threshold,
                           accuracy_level=accuracy_level, factory=factory, sample_shape=shape, sample_dtype=dtype)
    info = export_info(path)
    t = Table(title=f"{path} (opset {info.opset})")
    for c in ["layer", "type", "kernel", "weights", "ONNX ops", "note"]:
        t.add_column(c)
    for lay in info.layers:
        t.add_row(lay.name, lay.type, lay.kernel, lay.weights, lay.ops, escape(lay.fallback or lay.note or ""))
    out.print(t)
    for w in caught:
        if issubclass(w.category, ExportFallbackWarning):
            err.print(f"[yellow]warning:[/] {escape(str(w.message))}")
    err.print(f"wrote {path} ({path.stat().st_size} bytes); verified against the PyTorch model and "
              "registered in secquant.json")
