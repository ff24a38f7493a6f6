"""CLI commands that make and describe artifacts: quantize, qat, tune, inspect, presets."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import SecquantError
from .common import (RichProgress, err, existing, one_line, out, parse_sample_dtype, parse_sample_shape, parse_size,
                     print_privacy, read_passphrase, sample_dtype_option, sample_shape_option, user_errors,
                     weights_option)

app = typer.Typer()


@app.command()
@user_errors
def quantize(
    model: str = typer.Argument(..., help="builtin:digits, builtin:minilm, a Hugging Face model dir, or package.module:factory"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to create"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="a named recipe (see `secquant presets`)"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="a recipe file (YAML or JSON)"),
    calib: Optional[str] = typer.Option(None, "--calib", help="calibration data (text for encoders; .safetensors/.npy "
                                                              "tensors; FILE.age is decrypted in memory with "
                                                              "--identity), or 'synthetic' for data-free calibration"),
    weights: Optional[Path] = weights_option(),
    sample_shape: Optional[str] = sample_shape_option(),
    sample_dtype: Optional[str] = sample_dtype_option(),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer directory for a Hugging Face "
                                             "model directory that has none"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    dp_epsilon: Optional[float] = typer.Option(None, "--dp-epsilon", help="calibrate activation ranges with "
                                                                          "(epsilon, delta)-differential privacy"),
    dp_delta: Optional[float] = typer.Option(None, "--dp-delta", help="DP delta (with --dp-epsilon; default 1e-5; "
                                                                       "must be below 1/n)"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="age identity for an encrypted --calib FILE.age"),
    ask_passphrase: bool = typer.Option(False, "--passphrase", help="prompt for the identity's passphrase"),
    record_source_name: bool = typer.Option(False, "--record-source-name", help="record --calib's file name in the "
                                            "manifest (by default only its hash)"),
    strict: bool = typer.Option(False, "--strict", help="refuse (write nothing) when a module holding a weight matrix "
                                "or kernel would stay in float without the recipe asking for it"),
) -> None:
    """Quantize MODEL with a preset or recipe and write an artifact directory."""
    from ..api import quantize as _quantize

    if (preset is None) == (recipe is None):
        raise SecquantError("give exactly one of --preset P or --recipe FILE")
    shape, dtype = parse_sample_shape(sample_shape), parse_sample_dtype(sample_dtype)
    with RichProgress() as prog:  # api.quantize checks every other argument before the model loads
        qm = _quantize(model, recipe if recipe is not None else preset, out=out, calib=calib,
                       weights=existing(weights, "--weights"), overwrite=overwrite, progress=prog,
                       dp_epsilon=dp_epsilon, dp_delta=dp_delta, identity=identity,
                       passphrase=read_passphrase(ask_passphrase), record_source_name=record_source_name,
                       sample_shape=shape, sample_dtype=dtype, tokenizer=tokenizer, strict=strict)
    print_float_layers(qm.manifest.float_layers or [])
    err.print(f"wrote {out} ({quantized_summary(qm.manifest)} with {qm.manifest.recipe.name}; calibration data: "
              f"{qm.manifest.calibration.data})", highlight=False, soft_wrap=True)
    print_privacy(qm)


def quantized_summary(m) -> str:
    """'N layers quantized (K with float weights, activations only); M modules left in float (P parameters)'."""
    w_only = sum(1 for e in m.layers.values() if e.weight.args is None)
    left = [e for e in (m.float_layers or []) if e.name not in m.layers]
    text = f"{len(m.layers) - w_only} layers with quantized weights"
    if w_only:
        text += f", {w_only} with only their activations quantized"
    if left:
        text += f"; {len(left)} modules left in float ({sum(e.parameters for e in left):,} float values, listed above)"
    return text


def print_float_layers(rows) -> None:
    """The modules left in float: a table on a terminal, one plain line each otherwise."""
    if not rows:
        return
    if err.is_terminal:
        t = Table(title="left in float")
        for c in ("module", "type", "parameters", "reason"):
            t.add_column(c, overflow="fold")
        for e in rows:
            t.add_row(*(escape(v) for v in (e.name or "(model)", e.type, f"{e.parameters:,}", e.reason)))
        err.print(t)
        return
    for e in rows:
        err.print(f"float: {e.name or '(model)'} {e.type} {e.parameters} parameters: {e.reason}", highlight=False,
                  markup=False, soft_wrap=True)

@app.command()
@user_errors
def qat(
    model: str = typer.Argument(..., help="a classifier: builtin:digits or package.module:factory (+ --weights)"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to create"),
    epochs: int = typer.Option(..., "--epochs", min=1, help="passes over the training set"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="a named recipe, e.g. w4a4 or w2a8"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="a recipe file (YAML or JSON)"),
    lr: float = typer.Option(1e-3, "--lr", help="Adam learning rate (weights and step sizes)"),
    train: Optional[Path] = typer.Option(None, "--train", help="training data: .safetensors with 'inputs' and 'labels'"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="data to initialize activation ranges (default: the "
                                         "training set; with --dp-epsilon: public data sharing no sample with the "
                                         "training set (checked), default ZeroQ synthetic inputs)"),
    checkpoints: Optional[Path] = typer.Option(None, "--checkpoints", help="write a safetensors checkpoint per epoch here"),
    weights: Optional[Path] = weights_option(),
    sample_shape: Optional[str] = sample_shape_option(),
    sample_dtype: Optional[str] = sample_dtype_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    dp_epsilon: Optional[float] = typer.Option(None, "--dp-epsilon", help="retrain under DP-SGD (Opacus), spending at most this epsilon on the training set"),
    dp_delta: Optional[float] = typer.Option(None, "--dp-delta", help="DP delta (default 1e-5; must be below 1/n)"),
    max_grad_norm: float = typer.Option(1.0, "--max-grad-norm", help="DP-SGD per-sample gradient clipping norm"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of a reproducible non-private run (default 0); "
                                       "refused with --dp-epsilon, whose runs must not be replayable"),
    record_source_name: bool = typer.Option(False, "--record-source-name", help="record --train's file name in the "
                                            "manifest (by default only its hash)"),
) -> None:
    """Quantization-aware retraining (learned step sizes) of a classifier; writes an artifact."""
    from ..api import evaluate
    from ..api import qat as _qat

    if (preset is None) == (recipe is None):
        raise SecquantError("give exactly one of --preset P or --recipe FILE")
    shape, dtype = parse_sample_shape(sample_shape), parse_sample_dtype(sample_dtype)
    with RichProgress() as prog:
        qm = _qat(model, recipe if recipe is not None else preset, epochs=epochs, out=out, lr=lr, train=train,
                  calib=calib, checkpoint_dir=checkpoints, weights=existing(weights, "--weights"),
                  overwrite=overwrite, progress=prog, dp_epsilon=dp_epsilon, dp_delta=dp_delta,
                  max_grad_norm=max_grad_norm, seed=seed, record_source_name=record_source_name,
                  sample_shape=shape, sample_dtype=dtype)
        res = evaluate(qm, progress=prog) if model.startswith("builtin:") else None
    print_privacy(qm)
    summary = {"artifact": str(out), "recipe": qm.manifest.recipe.name, "training": qm.manifest.training}
    if res:
        summary.update({k: res[k] for k in ("metric", "value", "float_value", "size_bytes", "size_ratio")})
    sys.stdout.write(json.dumps(summary) + "\n")

@app.command()
@user_errors
def tune(
    model: str = typer.Argument(..., help="builtin:digits, builtin:minilm, a Hugging Face model dir, ..."),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory for the best model found"),
    max_drop: float = typer.Option(..., "--max-drop", help="tolerated metric drop: accuracy points, or mean cosine"),
    metric: Optional[str] = typer.Option(None, "--metric", help="accuracy (classifiers) or cosine (encoders)"),
    size_budget: Optional[str] = typer.Option(None, "--size-budget", help="largest model.safetensors, e.g. 5MB"),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", help="seconds for the search"),
    data: Optional[Path] = typer.Option(None, "--data", help="evaluation data (default: built-in held-out data)"),
    weights: Optional[Path] = weights_option(),
    sample_shape: Optional[str] = sample_shape_option(),
    sample_dtype: Optional[str] = sample_dtype_option(),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
) -> None:
    """Search bits per layer for the smallest model within --max-drop; always saves the best found.

    Exit code 0 when the goal was met, 3 when it was not (the best model is saved anyway).
    """
    from ..tuning import tune as _tune

    budget = parse_size(size_budget) if size_budget else None
    shape, dtype = parse_sample_shape(sample_shape), parse_sample_dtype(sample_dtype)
    with RichProgress() as prog:
        res = _tune(model, max_drop=max_drop, metric=metric, size_budget=budget, time_budget=time_budget,
                    data=existing(data, "--data"), out=out, overwrite=overwrite, progress=prog,
                    log=lambda s: err.print(s, highlight=False, soft_wrap=True), weights=existing(weights, "--weights"),
                    sample_shape=shape, sample_dtype=dtype)
    sys.stdout.write(json.dumps(res.summary) + "\n")
    if not res.goal_met:
        raise typer.Exit(3)

@app.command()
@user_errors
def inspect(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    as_json: bool = typer.Option(False, "--json", help="print the manifest summary as JSON"),
) -> None:
    """Show an artifact's per-layer quantization table."""
    from ..artifact import read_manifest
    from ..artifact.store import describe

    m = read_manifest(Path(artifact))
    rows = describe(m)
    if as_json:
        sys.stdout.write(json.dumps({"model": m.model.spec, "recipe": m.recipe.name, "layers": rows,
                                     "source": m.source.model_dump(), "calibration": m.calibration.model_dump(),
                                     "tuning": m.tuning,
                                     "float_layers": None if m.float_layers is None else
                                     [e.model_dump() for e in m.float_layers]}) + "\n")
        return
    t = Table(title=f"{artifact}: {m.model.spec}, recipe {m.recipe.name}, calibration: {m.calibration.data}")
    t.add_column("layer", overflow="fold", min_width=12)
    cols = ["type", "shape", "w_bits", "w_format", "w_granularity", "w_range", "w_transform", "w_algorithm", "a_bits",
            "a_mode"]
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(str(r[c]) if r[c] is not None else "-" for c in ["layer", *cols]))
    out.print(t)
    if m.float_layers:
        left = ", ".join(f"{e.name or '(model)'} ({e.type}, {e.reason})" for e in m.float_layers)
        out.print(one_line(f"left in float: {left}", 4000), highlight=False, markup=False, soft_wrap=True)
    if m.tuning:
        out.print(f"tuned: {m.tuning.get('statement', '')}", highlight=False, soft_wrap=True)

@app.command()
def presets() -> None:
    """List the built-in presets."""
    from ..recipes import PRESETS

    t = Table(title="presets")
    t.add_column("name")
    t.add_column("description")
    for name, r in PRESETS.items():
        t.add_row(name, r.description)
    out.print(t)
