"""CLI commands: `secquant watermark keygen | embed | verify` (registered by secquant.cli)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Optional

import typer

from ..security.watermark_params import DEFAULT_MAX_TAU, DEFAULT_STRENGTH, DEFAULT_THRESHOLD
from .common import (MIN_RELEASE_HELP, RichProgress, describe_release, err, existing, factory_option,
                     parse_sample_dtype, parse_sample_shape, read_passphrase, sample_dtype_option, sample_shape_option,
                     user_errors, weights_option)

EXIT_NOT_DETECTED = 3  # 0: detected, 2: error (user_errors), 3: verified, no mark found

app = typer.Typer()


wm = typer.Typer(no_args_is_help=True, help="Keyed owner watermark in the rounding directions of quantized "
                                            "weights, detected against the owner's float model.")
app.add_typer(wm, name="watermark")


@wm.command("keygen")
@user_errors
def keygen(out: Path = typer.Option(..., "--out", "-o", help="key file to create (mode 0600, never overwritten)")) -> None:
    """Create a secret watermark key (32 random bytes, hex); print its public commitment."""
    from ..security.watermark import as_key
    from ..security.watermark import keygen as _keygen

    p = _keygen(out)
    k = as_key(p)
    err.print(f"wrote {p} (mode 0600); key id {k.key_id}. Keep it secret: whoever holds it can verify the "
              "mark and also strip it. The line printed is a public commitment to the key.",
              highlight=False, soft_wrap=True)
    sys.stdout.write(k.commitment + "\n")

@wm.command("embed")
@user_errors
def embed(
    model: str = typer.Argument(..., help="builtin:digits, builtin:minilm, a Hugging Face model dir, or package.module:factory"),
    key: Path = typer.Option(..., "--key", "-k", help="watermark key file (`secquant watermark keygen`)"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to create"),
    preset: Optional[str] = typer.Option(None, "--preset", "-p", help="a named recipe with integer weights"),
    recipe: Optional[Path] = typer.Option(None, "--recipe", "-r", help="a recipe file (YAML or JSON)"),
    calib: Optional[Path] = typer.Option(None, "--calib", help="calibration data"),
    weights: Optional[Path] = weights_option(),
    sample_shape: Optional[str] = sample_shape_option(),
    sample_dtype: Optional[str] = sample_dtype_option(),
    strength: Optional[float] = typer.Option(None, "--strength", help="expected z-score of the fresh mark (sets "
                                             f"tau = z / sqrt(12 N)); default: {DEFAULT_STRENGTH:g}, with tau at "
                                             f"most {DEFAULT_MAX_TAU:g}"),
    tau: Optional[float] = typer.Option(None, "--tau", help="fix the band half-width in steps (0 < tau <= 0.5) "
                                                            "instead of deriving it from --strength"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
) -> None:
    """Quantize MODEL and mark its integer weights with KEY; write the artifact and print JSON."""
    from ..api import precheck, quantize, resolve_recipe
    from ..artifact import save_artifact
    from ..errors import OutputExistsError, SecquantError
    from ..security.watermark import as_key, embed_watermark, verify_watermark

    if (preset is None) == (recipe is None):
        raise SecquantError("give exactly one of --preset P or --recipe FILE")
    if strength is not None and tau is not None:
        raise SecquantError("give --strength or --tau, not both")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists: choose another --out or remove it first")
    k = as_key(key)  # a bad key fails before any work
    rec = resolve_recipe(recipe if recipe is not None else preset)
    shape, dtype = parse_sample_shape(sample_shape), parse_sample_dtype(sample_dtype)
    precheck(model, rec, out=out, overwrite=overwrite, calib=calib, weights=weights)  # before the model loads
    with RichProgress() as prog:
        qm = quantize(model, rec, calib=calib, weights=existing(weights, "--weights"), progress=prog,
                      sample_shape=shape, sample_dtype=dtype)
    source = qm.handle.module
    rep = embed_watermark(qm.module, source, k, tau=tau, strength=strength)
    if rep.log10_p_value > math.log10(DEFAULT_THRESHOLD):  # nothing is written for a mark too weak
        raise SecquantError(f"the mark is too weak to detect (z = {rep.z:.2f}, p = {10 ** rep.log10_p_value:.3g} > "
                            f"{DEFAULT_THRESHOLD:g}): the model has too few integer weights for tau {rep.tau:g}; "
                            "raise --strength or --tau")
    m = qm.manifest
    layers = {n: e.model_dump() for n, e in m.layers.items()}
    save_artifact(out, qm.module, qm.handle, m.recipe, layers, m.source, m.calibration, overwrite,
                  tuning=m.tuning, privacy=m.privacy.entries, watermark=rep.record(),
                  float_layers=None if m.float_layers is None else [e.model_dump() for e in m.float_layers])
    written: object = out
    if m.model.rebuild.get("loader") == "factory":  # rebuilt with the factory the user just named
        from ..api import load

        written = load(out, factory=model, allow_unsealed=True)
    check = verify_watermark(written, k, float_model=source)  # from the written files, as a verifier would
    res = {"artifact": str(out), "recipe": m.recipe.name, **rep.to_dict(),
           "verify": {k_: getattr(check, k_) for k_ in ("detected", "n", "z", "p_value", "log10_p_value")}}
    sys.stdout.write(json.dumps(res) + "\n")
    err.print(f"wrote {out}: {rep.changed} of {rep.n} weights re-rounded toward their keyed sign (tau "
              f"{rep.tau:.4f} steps); verified from the written files: z = {check.z:.1f}, "
              f"p <= {check.p_value:.3g}", highlight=False, soft_wrap=True)

@wm.command("verify")
@user_errors
def verify(
    model: Path = typer.Argument(..., help="artifact directory, or a sealed file (with --identity and "
                                           "--verify-key)"),
    key: Path = typer.Option(..., "--key", "-k", help="watermark key file"),
    threshold: float = typer.Option(DEFAULT_THRESHOLD, "--threshold", help="detect when the false-positive bound "
                                                                           "(p-value) is at most this"),
    as_json: bool = typer.Option(False, "--json", help="print the full report as JSON"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="the owner's marked artifact directory: its "
                                             "grid (scales, smoothing, rotation) and layers; needed when MODEL was "
                                             "re-quantized (default: MODEL's own)"),
    float_model: Optional[str] = typer.Option(None, "--float", help="the owner's float model the mark is measured "
                                              "against (default: the one the reference's manifest names, checked "
                                              "against its source hash)"),
    weights: Optional[Path] = weights_option("float weights of a factory --float model"),
    factory: Optional[str] = factory_option(),
    identity: Optional[Path] = typer.Option(None, "--identity", help="age identity (sealed files)"),
    verify_key: Optional[Path] = typer.Option(None, "--verify-key", help="signer's public key (sealed files)"),
    ask_passphrase: bool = typer.Option(False, "--passphrase", help="prompt for the identity's passphrase"),
    min_release: Optional[int] = typer.Option(None, "--min-release", min=0, help=MIN_RELEASE_HELP),
) -> None:
    """Test MODEL for KEY's watermark. Exit 0: detected; 3: not detected; 2: error."""
    from ..errors import SecquantError
    from ..security.watermark import as_key, verify_watermark

    if not model.exists():
        raise SecquantError(f"{model} does not exist")
    if reference is not None and not reference.is_dir():
        raise SecquantError(f"--reference {reference} is not an artifact directory")
    k = as_key(key)  # a bad key fails before any loading
    w = existing(weights, "--weights")
    if model.is_dir() and min_release is not None:
        raise SecquantError("--min-release applies to sealed files: a plain directory's release is not signed")
    from ..api import load

    fmod = None
    if float_model is not None:
        from ..models import load_model

        fmod = load_model(float_model, w).module
    target: object = model
    if model.is_file():
        target = load(model, identity=identity, verify_key=verify_key, passphrase=read_passphrase(ask_passphrase),
                      min_release=min_release, factory=factory)
        err.print(f"opened and verified {model} ({describe_release(target)})", highlight=False, soft_wrap=True)
    elif factory is not None:  # a factory-built artifact: rebuilt with the factory the user confirms
        target = load(model, factory=factory, allow_unsealed=True)
    if reference is not None and factory is not None:
        reference = load(reference, factory=factory, allow_unsealed=True)
    rep = verify_watermark(target, k, threshold=threshold, reference=reference, float_model=fmod)
    if as_json:
        sys.stdout.write(json.dumps({"model": str(model), **rep.to_dict()}) + "\n")
    else:
        verdict = "DETECTED" if rep.detected else "not detected"
        sys.stdout.write(f"watermark {verdict} (key {rep.key_id}): z = {rep.z:.2f} over {rep.n} weights, "
                         f"p-value (false-positive bound) = {rep.p_value:.3g} [log10 {rep.log10_p_value:.1f}], "
                         f"threshold {threshold:g}\n")
        for note in rep.notes:
            err.print(f"note: {note}", highlight=False, soft_wrap=True)
    if not rep.detected:
        raise typer.Exit(EXIT_NOT_DETECTED)
