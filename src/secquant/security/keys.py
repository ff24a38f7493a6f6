"""Key material in standard formats.

- age X25519 identity (`NAME.key`, the `age-keygen` text format; optionally passphrase-
  encrypted with age's scrypt recipient) and its recipient (`NAME.pub`, `age1...`): who may
  decrypt. The recipient list of a sealed model is its access-control list.
- ECDSA P-256 signing key pair (`NAME.sign.key` PKCS#8 PEM, optionally encrypted;
  `NAME.sign.pub`), the key type the OpenSSF model-signing "key" method accepts.

Private files are created with mode 0600 and never overwritten.
"""

from __future__ import annotations

import datetime as _dt
import os
from dataclasses import dataclass
from pathlib import Path

import pyrage
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pyrage import x25519

from ..errors import SecquantError


class KeyError_(SecquantError):
    """A key file is missing, malformed, or its passphrase is wrong."""


@dataclass
class KeyFiles:
    identity: Path
    recipient: Path
    sign_key: Path
    verify_key: Path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` exclusively with `mode` (temp name + link, so it appears whole or not at all)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, mode)
        os.link(tmp, path)  # fails if path exists: never overwrite a key
    finally:
        tmp.unlink(missing_ok=True)


def keygen(out: str | Path, passphrase: str | None = None) -> KeyFiles:
    """Write NAME.key, NAME.pub, NAME.sign.key, NAME.sign.pub for the prefix `out`."""
    base = Path(out)
    files = KeyFiles(base.with_name(base.name + ".key"), base.with_name(base.name + ".pub"),
                     base.with_name(base.name + ".sign.key"), base.with_name(base.name + ".sign.pub"))
    existing = [str(p) for p in vars(files).values() if p.exists()]
    if existing:
        raise SecquantError(f"refusing to overwrite existing key files: {', '.join(existing)}")
    base.parent.mkdir(parents=True, exist_ok=True)
    ident = x25519.Identity.generate()
    recipient = str(ident.to_public())
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    ident_text = f"# created: {created}\n# public key: {recipient}\n{ident}\n".encode()
    if passphrase:
        ident_text = pyrage.passphrase.encrypt(ident_text, passphrase)
    sk = ec.generate_private_key(ec.SECP256R1())
    enc = (serialization.BestAvailableEncryption(passphrase.encode()) if passphrase
           else serialization.NoEncryption())
    sk_pem = sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
    pk_pem = sk.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    written: list[Path] = []
    try:
        for path, data, mode in [(files.identity, ident_text, 0o600), (files.sign_key, sk_pem, 0o600),
                                 (files.recipient, (recipient + "\n").encode(), 0o644),
                                 (files.verify_key, pk_pem, 0o644)]:
            _write_new(path, data, mode)
            written.append(path)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return files


def load_recipients(values: list[str]) -> list[x25519.Recipient]:
    """Recipients given as `age1...` strings or as files holding one per line."""
    out = []
    for v in values:
        p = Path(v)
        lines = p.read_text().split() if not v.startswith("age1") and p.is_file() else [v]
        for line in lines:
            try:
                out.append(x25519.Recipient.from_str(line.strip()))
            except Exception:
                raise KeyError_(f"{v!r} is not an age X25519 recipient (age1...) or a file of them") from None
    if not out:
        raise KeyError_("no recipients: give at least one --to age1... (or a .pub file)")
    return out


def load_identities(path: str | Path, passphrase: str | None = None) -> list[x25519.Identity]:
    """Identities from an age identity file (plain, or passphrase-encrypted with age)."""
    p = Path(path)
    if not p.is_file():
        raise KeyError_(f"identity file {p} does not exist")
    data = p.read_bytes()
    if data.startswith(b"age-encryption.org/"):
        if not passphrase:
            raise KeyError_(f"{p} is passphrase-protected: give its passphrase")
        try:
            data = pyrage.passphrase.decrypt(data, passphrase)
        except Exception:
            raise KeyError_(f"{p}: wrong passphrase") from None
    ids = []
    for line in data.decode(errors="replace").splitlines():
        line = line.strip()
        if line.startswith("AGE-SECRET-KEY-"):
            try:
                ids.append(x25519.Identity.from_str(line))
            except Exception:
                raise KeyError_(f"{p}: malformed age identity") from None
    if not ids:
        raise KeyError_(f"{p} holds no age identity (AGE-SECRET-KEY-...)")
    return ids
