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
    fmt: str = typer.Option("onnx", "--format", help="onnx (model.onnx added to the artifact) or compressed-tensors "
                                                     "(a Hugging Face directory at --out that transformers loads)"),
    out_dir: Path | None = typer.Option(None, "--out", help="compressed-tensors: the output directory"),
    overwrite: bool = typer.Option(False, "--overwrite", help="compressed-tensors: replace an existing --out"),
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
    """Export an artifact to ONNX (integer kernels for ONNX Runtime) and register it in the manifest, or write a
    quantized Hugging Face causal LM in the compressed-tensors format (--format compressed-tensors --out DIR)."""
    from ..errors import SecquantError
    from ..runtime import ExportFallbackWarning, export_info, export_onnx

    if fmt not in ("onnx", "compressed-tensors"):
        raise SecquantError(f"unknown --format {fmt!r}: choose onnx or compressed-tensors")
    if not artifact.is_dir():
        raise SecquantError(f"{artifact} is not an artifact directory")
    if fmt == "compressed-tensors":
        _export_compressed(artifact, out_dir, overwrite)
        return
    if out_dir is not None:
        raise SecquantError("--out is for --format compressed-tensors (ONNX goes into the artifact as model.onnx)")
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


def _export_compressed(artifact: Path, out_dir: Path | None, overwrite: bool) -> None:
    from ..artifact.fsutil import refuse_existing
    from ..errors import SecquantError
    from ..models import load_artifact
    from ..runtime import export_compressed_tensors

    if out_dir is None:
        raise SecquantError("--format compressed-tensors writes a Hugging Face directory: pass --out DIR")
    refuse_existing(out_dir, overwrite)
    la = load_artifact(artifact)
    cfg = artifact / "config.json"
    path = export_compressed_tensors(la.module, cfg if cfg.is_file() else None, out_dir, tokenizer_dir=artifact,
                                     overwrite=overwrite)
    err.print(f"wrote {path} (compressed-tensors; load it with transformers' AutoModelForCausalLM.from_pretrained "
              "and the compressed-tensors package installed)")
