"""CLI commands for keys and sealed files: keygen, seal, open, reseal."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import SecquantError
from .common import MIN_RELEASE_HELP, describe_release, err, read_passphrase, user_errors

app = typer.Typer()


@app.command()
@user_errors
def keygen(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="key name prefix: writes NAME.key, NAME.pub, NAME.sign.key, NAME.sign.pub"),
    passphrase: bool = typer.Option(False, "--passphrase", help="protect the private keys with a passphrase (prompted, or $SECQUANT_PASSPHRASE)"),
    reprotect: Optional[Path] = typer.Option(None, "--reprotect", help="instead: re-encrypt this existing signing key "
                                             "(NAME.sign.key) in place with scrypt, at its identity's cost"),
) -> None:
    """Create an age X25519 identity (decryption) and a P-256 signing key pair (model-signing)."""
    from ..security import keygen as _keygen
    from ..security import reprotect_sign_key

    if (out is None) == (reprotect is None):
        raise SecquantError("give --out NAME to create keys, or --reprotect NAME.sign.key to re-protect one")
    if reprotect is not None:
        prot = reprotect_sign_key(reprotect, read_passphrase(True, confirm=True))
        err.print(f"re-protected {reprotect} with scrypt (N=2^{prot.log_n}, r={prot.r}, p={prot.p}); its public key "
                  "is unchanged", highlight=False, soft_wrap=True)
        return
    files = _keygen(out, read_passphrase(passphrase, confirm=True))
    recipient = files.recipient.read_text().strip()
    err.print(f"wrote {files.identity} and {files.sign_key} (mode 0600), {files.recipient}, {files.verify_key}",
              highlight=False, soft_wrap=True)
    sys.stdout.write(recipient + "\n")

@app.command()
@user_errors
def seal(
    artifact: Path = typer.Argument(..., help="artifact directory"),
    to: list[str] = typer.Option(..., "--to", help="age recipient (age1...) or a .pub file; repeat for several"),
    sign_key: Path = typer.Option(..., "--sign-key", help="P-256 PEM private key (NAME.sign.key)"),
    out: Path = typer.Option(..., "--out", "-o", help="sealed file to write"),
    passphrase: bool = typer.Option(False, "--passphrase", help="the signing key is passphrase-protected"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    release: Optional[int] = typer.Option(None, "--release", min=0, help="release number, signed with the model "
                                          "(default: the UTC time in seconds); receivers refuse older ones with "
                                          "--min-release"),
) -> None:
    """Sign the artifact (OpenSSF model-signing) and encrypt it to the recipients (age)."""
    from ..security import seal as _seal
    from ..security.release import new_release

    number = new_release(release).release  # the default (UTC seconds) fixed here, to be reported
    _seal(artifact, to, sign_key, out, read_passphrase(passphrase), overwrite, release=number)
    err.print(f"sealed {artifact} -> {out} for {len(to)} recipient(s), release {number}", highlight=False,
              soft_wrap=True)

@app.command("open")
@user_errors
def open_(
    sealed: Path = typer.Argument(..., help="sealed file"),
    identity: Path = typer.Option(..., "--identity", help="age identity file (NAME.key)"),
    verify_key: Path = typer.Option(..., "--verify-key", help="signer's public key (NAME.sign.pub)"),
    out: Path = typer.Option(..., "--out", "-o", help="artifact directory to create"),
    passphrase: bool = typer.Option(False, "--passphrase", help="the identity is passphrase-protected"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
    min_release: Optional[int] = typer.Option(None, "--min-release", min=0, help=MIN_RELEASE_HELP),
) -> None:
    """Decrypt a sealed model, verify its signature and hashes, and write the artifact directory."""
    from ..security import open_sealed

    open_sealed(sealed, identity, verify_key, out, read_passphrase(passphrase), overwrite, min_release=min_release)
    err.print(f"opened and verified {sealed} -> {out} ({describe_release(out)})", highlight=False, soft_wrap=True)

@app.command()
@user_errors
def reseal(
    sealed: Path = typer.Argument(..., help="sealed file"),
    identity: Path = typer.Option(..., "--identity", help="an age identity the file is sealed to"),
    to: list[str] = typer.Option(..., "--to", help="the NEW complete recipient list (age1... or .pub files)"),
    out: Path = typer.Option(..., "--out", "-o", help="resealed file to write"),
    passphrase: bool = typer.Option(False, "--passphrase", help="the identity is passphrase-protected"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
) -> None:
    """Change who can open a sealed model (add, remove, rotate) without writing the plaintext."""
    from ..security import reseal as _reseal

    _reseal(sealed, identity, to, out, read_passphrase(passphrase), overwrite)
    err.print(f"resealed {sealed} -> {out} for {len(to)} recipient(s)", highlight=False, soft_wrap=True)
