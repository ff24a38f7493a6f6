"""CLI commands: integrity (check every tensor of a model against the checksums recorded at seal time)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from .common import MIN_RELEASE_HELP, describe_release, err, factory_option, read_passphrase, user_errors

app = typer.Typer()


@app.command()
@user_errors
def integrity(
    model: Path = typer.Argument(..., help="a sealed file, or an artifact directory opened from one"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="age identity (sealed files)"),
    verify_key: Optional[Path] = typer.Option(None, "--verify-key", help="signer's public key (sealed files)"),
    ask_passphrase: bool = typer.Option(False, "--passphrase", help="prompt for the identity's passphrase"),
    min_release: Optional[int] = typer.Option(None, "--min-release", min=0, help=MIN_RELEASE_HELP),
    factory: Optional[str] = factory_option(),
) -> None:
    """Check every tensor the model computes with (codes, scales, biases, caches, ...) against the keyed
    checksums sealed with it; print JSON."""
    from ..api import load
    from ..errors import SecquantError

    if not model.exists():
        raise SecquantError(f"{model} does not exist")
    qm = load(model, identity=identity, verify_key=verify_key, passphrase=read_passphrase(ask_passphrase),
              allow_unsealed=True, min_release=min_release,
              factory=factory)  # loading checks the record, refuses a mismatch
    found = qm.check_integrity()
    g = qm.integrity
    res = {"model": str(model), "intact": not found, "layers": len(g.layers), "tensors": len(g.tensors),
           "groups": g.groups, "group_bytes": g.group_bytes,
           "release": qm.release.release if qm.release is not None else None}
    typer.echo(json.dumps(res))
    err.print(f"intact: every group of the {len(g.tensors)} tensors of {len(g.layers)} quantized layers matches "
              "the sealed checksums" + (f"; {describe_release(qm)}" if model.is_file() else ""),
              highlight=False, soft_wrap=True)
