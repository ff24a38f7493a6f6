"""CLI command that runs a quantized causal language model: generate."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import MIN_RELEASE_HELP, read_passphrase, user_errors

app = typer.Typer()


@app.command()
@user_errors
def generate(
    artifact: Path = typer.Argument(..., help="a causal LM: an artifact directory, or a sealed file (with "
                                              "--identity and --verify-key)"),
    prompt: str = typer.Option(..., "--prompt", help="the text to continue"),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", min=1, help="most tokens to generate"),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="sample with this "
                                                "temperature (default: greedy decoding; 0 is greedy too)"),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="sample from the k most likely tokens"),
    seed: Optional[int] = typer.Option(None, "--seed", help="seed of the sampling (with --temperature/--top-k)"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="age identity a sealed file is sealed to"),
    verify_key: Optional[Path] = typer.Option(None, "--verify-key", help="signer's public key (sealed file)"),
    passphrase: bool = typer.Option(False, "--passphrase", help="the identity is passphrase-protected"),
    min_release: Optional[int] = typer.Option(None, "--min-release", min=0, help=MIN_RELEASE_HELP),
) -> None:
    """Continue a prompt with a quantized causal LM; print one JSON object (the new text in "text")."""
    from ..api import generate as _generate, load
    from ..models.causal_lm import check_generation

    check_generation(prompt, max_new_tokens, temperature, top_k, seed)  # before the model loads
    # a directory is opened like `eval` opens it (naming it is the opt-in), a file like `serve` opens one
    qm = load(artifact, identity=identity, verify_key=verify_key, passphrase=read_passphrase(passphrase),
              allow_unsealed=True, min_release=min_release)
    res = _generate(qm, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, seed=seed)
    sys.stdout.write(json.dumps(res) + "\n")
