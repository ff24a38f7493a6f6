"""CLI commands: `secquant watermark keygen | embed | verify` (registered by secquant.cli)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..security.watermark_params import DEFAULT_STRENGTH, DEFAULT_THRESHOLD
from .common import MIN_RELEASE_HELP, RichProgress, describe_release, err, read_passphrase, user_errors

EXIT_NOT_DETECTED = 3  # 0: detected, 2: error (user_errors), 3: verified, no mark found

app = typer.Typer()


wm = typer.Typer(no_args_is_help=True, help="Keyed owner watermark in the rounding of quantized weights.")
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
    weights: Optional[Path] = typer.Option(None, "--weights", help="weights for a factory model (.safetensors)"),
    strength: float = typer.Option(DEFAULT_STRENGTH, "--strength", min=1.0, help="expected z-score of the fresh mark (sets tau)"),
    tau: Optional[float] = typer.Option(None, "--tau", help="fix the band half-width in steps (0 < tau <= 0.5) "
                                                            "instead of deriving it from --strength"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
) -> None:
    """Quantize MODEL and mark its integer weights with KEY; write the artifact and print JSON."""
    from ..api import quantize
    from ..artifact import save_artifact
    from ..errors import OutputExistsError, SecquantError
    from ..security.watermark import as_key, embed_watermark, verify_watermark

    if (preset is None) == (recipe is None):
        raise SecquantError("give exactly one of --preset P or --recipe FILE")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"{out} already exists: choose another --out or remove it first")
    k = as_key(key)  # a bad key fails before any work
    with RichProgress() as prog:
        qm = quantize(model, recipe if recipe is not None else preset, calib=calib,
                      weights=str(weights) if weights else None, progress=prog)
    rep = embed_watermark(qm.module, qm.handle.module, k, tau=tau, strength=strength)
    pre = verify_watermark(qm.module, k)
    if not pre.detected:  # nothing is written for a mark that could not be found again
        raise SecquantError(f"the mark is too weak to detect (p = {pre.p_value:.3g}): the model has too few "
                            "integer weights for this strength; raise --strength or --tau")
    m = qm.manifest
    layers = {n: e.model_dump() for n, e in m.layers.items()}
    save_artifact(out, qm.module, qm.handle, m.recipe, layers, m.source, m.calibration, overwrite,
                  tuning=m.tuning, privacy=m.privacy.entries,
                  watermark={"scheme": rep.scheme, "key_id": rep.key_id, "commitment": rep.commitment,
                             "tau": rep.tau})
    check = verify_watermark(out, k)  # from the written files, as a verifier would
    res = {"artifact": str(out), "recipe": m.recipe.name, **rep.to_dict(),
           "verify": {k_: getattr(check, k_) for k_ in ("detected", "matches", "n", "z", "p_value",
                                                       "log10_p_value")}}
    sys.stdout.write(json.dumps(res) + "\n")
    err.print(f"wrote {out}: {rep.changed} of {rep.keyed} weights re-rounded to the keyed parity (tau "
              f"{rep.tau:.4f} steps), {rep.balanced} more to balance them; "
              f"verified, p = {check.p_value:.3g}", highlight=False, soft_wrap=True)

@wm.command("verify")
@user_errors
def verify(
    model: Path = typer.Argument(..., help="artifact directory, or a sealed file (with --identity and --verify-key)"),
    key: Path = typer.Option(..., "--key", "-k", help="watermark key file"),
    threshold: float = typer.Option(DEFAULT_THRESHOLD, "--threshold", help="detect when the false-positive probability "
                                                               "(p-value) is at most this"),
    as_json: bool = typer.Option(False, "--json", help="print the full report as JSON"),
    reference: Optional[Path] = typer.Option(None, "--reference", help="the owner's marked artifact directory: "
                                             "round MODEL's weights onto its grid first (survives "
                                             "re-quantization with re-searched scales)"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="age identity (sealed files)"),
    verify_key: Optional[Path] = typer.Option(None, "--verify-key", help="signer's public key (sealed files)"),
    ask_passphrase: bool = typer.Option(False, "--passphrase", help="prompt for the identity's passphrase"),
    min_release: Optional[int] = typer.Option(None, "--min-release", min=0, help=MIN_RELEASE_HELP),
) -> None:
    """Test MODEL for KEY's watermark. Exit 0: detected; 3: not detected; 2: error."""
    from ..errors import SecquantError
    from ..security.watermark import verify_watermark

    if not model.exists():
        raise SecquantError(f"{model} does not exist")
    target: object = model
    if model.is_file():
        from ..api import load

        qm = load(model, identity=identity, verify_key=verify_key, passphrase=read_passphrase(ask_passphrase),
                  min_release=min_release)
        err.print(f"opened and verified {model} ({describe_release(qm)})", highlight=False, soft_wrap=True)
        target = qm.module
    elif min_release is not None:
        raise SecquantError("--min-release applies to sealed files: a plain directory's release is not signed")
    if reference is not None and not reference.is_dir():
        raise SecquantError(f"--reference {reference} is not an artifact directory")
    rep = verify_watermark(target, key, threshold=threshold, reference=reference)
    if as_json:
        sys.stdout.write(json.dumps({"model": str(model), **rep.to_dict()}) + "\n")
    else:
        verdict = "DETECTED" if rep.detected else "not detected"
        sys.stdout.write(f"watermark {verdict} (key {rep.key_id}): {rep.matches}/{rep.n} parity matches, "
                         f"z = {rep.z:.2f}, p-value (false-positive probability) = {rep.p_value:.3g} "
                         f"[log10 {rep.log10_p_value:.1f}], threshold {threshold:g}\n")
    if not rep.detected:
        raise typer.Exit(EXIT_NOT_DETECTED)
