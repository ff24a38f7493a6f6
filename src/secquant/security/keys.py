"""Key material in standard formats.

- age X25519 identity (`NAME.key`, the `age-keygen` text format; optionally passphrase-
  encrypted with age's scrypt recipient) and its recipient (`NAME.pub`, `age1...`): who may
  decrypt. The recipient list of a sealed model is its access-control list.
- ECDSA P-256 signing key pair (`NAME.sign.key` PKCS#8 PEM, optionally encrypted;
  `NAME.sign.pub`), the key type the OpenSSF model-signing "key" method accepts.

One passphrase protects both private files with the same memory-hard KDF at the same cost: age
encrypts the identity with scrypt at a work factor it calibrates to this machine, and the
signing key is a standard PBES2/scrypt PKCS#8 PEM at that same work factor (security.pkcs8_scrypt),
not the PBKDF2 of `cryptography`'s own serializer, which would make the passphrase ~2,000x
cheaper to guess through the signing key. Older PBKDF2-protected keys still load, with a warning
and a way to re-protect them in place (`reprotect_sign_key`, `secquant keygen --reprotect`).

Private files are created with mode 0600 and never overwritten; using one that other users can
read prints a warning.
"""

from __future__ import annotations

import datetime as _dt
import re
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import pyrage
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pyrage import x25519

from ..artifact.fsutil import atomic_file
from ..errors import SecquantError
from .pkcs8_scrypt import KeyProtection, encrypt_private_key, key_protection

AGE_DEFAULT_LOG_N = 18  # the reference age implementation's scrypt work factor (rage calibrates its own)
_AGE_SCRYPT = re.compile(rb"^-> scrypt \S+ (\d+)$", re.MULTILINE)


class KeyError_(SecquantError):
    """A key file is missing, malformed, or its passphrase is wrong."""


@dataclass
class KeyFiles:
    identity: Path
    recipient: Path
    sign_key: Path
    verify_key: Path


def _write_new(path: Path, data: bytes, mode: int) -> None:
    """Create `path` with `mode`, whole or not at all, never replacing an existing key."""
    with atomic_file(path, mode=mode, exclusive=True) as tmp:
        tmp.write_bytes(data)


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
    sk = ec.generate_private_key(ec.SECP256R1())
    if passphrase:
        ident_text = pyrage.passphrase.encrypt(ident_text, passphrase)
        sk_pem = encrypt_private_key(sk, passphrase, age_scrypt_log_n(ident_text) or AGE_DEFAULT_LOG_N)
    else:
        sk_pem = sk.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption())
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
    warn_if_exposed(p, "identity")
    return ids


def _warn(message: str) -> None:
    """One line on stderr: these warnings concern the person at the keyboard, not a log."""
    sys.stderr.write(f"warning: {message}\n")
    sys.stderr.flush()


def warn_if_exposed(path: Path, what: str) -> bool:
    """Warn when the private key file `path` can be read or changed by other users; True if so."""
    mode = stat.S_IMODE(Path(path).stat().st_mode)
    if not mode & 0o077:
        return False
    who = " and ".join(w for w, bits in (("its group", 0o070), ("all users", 0o007)) if mode & bits)
    _warn(f"the {what} key file {path} is open to {who} (mode {mode:04o}): anyone who can read it holds your "
          f"key; run `chmod 600 {path}`")
    return True


def age_scrypt_log_n(age_file: bytes) -> int | None:
    """The scrypt work factor (log2 N) of an age passphrase-encrypted file, from its header."""
    head = age_file[: age_file.find(b"\n---") + 1] if b"\n---" in age_file else b""
    m = _AGE_SCRYPT.search(head)
    return int(m.group(1)) if m else None


def check_sign_key(path: Path) -> KeyProtection | None:
    """Before signing: warn if the signing key file is open to other users, or if its passphrase
    is protected by a KDF far cheaper to guess than age's scrypt (a key from before scrypt)."""
    p = Path(path)
    if not p.is_file():
        return None  # the signer's loader says it does not exist
    data = p.read_bytes()
    if b"PRIVATE KEY-----" not in data:
        return None  # not a private key: the signer's loader refuses it
    warn_if_exposed(p, "signing")
    prot = key_protection(data)
    if prot.kdf not in ("none", "scrypt", "unknown"):
        detail = f"{prot.iterations} PBKDF2 iterations" if prot.kdf == "pbkdf2" else prot.kdf
        _warn(f"the signing key {p} is protected by {detail}, far cheaper to guess than scrypt: re-protect it "
              f"with `secquant keygen --reprotect {p} --passphrase`")
    return prot


def reprotect_sign_key(path: str | Path, passphrase: str, log_n: int | None = None) -> KeyProtection:
    """Re-encrypt a signing key file in place under scrypt (same key, same public key).

    The work factor is `log_n`, else that of the passphrase-protected identity next to it
    (NAME.key for NAME.sign.key), else the one age calibrates on this machine now."""
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    p = Path(path)
    if not p.is_file():
        raise KeyError_(f"signing key {p} does not exist")
    if not passphrase:
        raise KeyError_("give the passphrase to protect the key with (--passphrase or $SECQUANT_PASSPHRASE)")
    old = p.read_bytes()
    try:
        key = load_pem_private_key(old, None if key_protection(old).kdf == "none" else passphrase.encode())
    except (ValueError, TypeError):
        raise KeyError_(f"{p}: not a PEM private key, or the passphrase is wrong") from None
    if log_n is None:
        ident = p.with_name(p.name.removesuffix(".sign.key") + ".key")
        if p.name.endswith(".sign.key") and ident.is_file():
            log_n = age_scrypt_log_n(ident.read_bytes()[:4096])
        log_n = log_n or age_scrypt_log_n(pyrage.passphrase.encrypt(b"", passphrase)) or AGE_DEFAULT_LOG_N
    data = encrypt_private_key(key, passphrase, log_n)
    with atomic_file(p, mode=0o600) as tmp:
        tmp.write_bytes(data)
    return key_protection(data)
