"""Reversible masking: the replaced values, by position, in a reverse table encrypted with age (pyrage).

Why this and not FF1 format-preserving encryption (NIST SP 800-38G), which would replace the withdrawn FF3-1:
- no maintained, independently reviewed FF1 for Python exists on PyPI today (the candidates are young single-author
  packages, some needing Python >= 3.12); age is a reviewed, standard format secquant already uses for sealing;
- FF1 on small domains (a 4-digit extension, a short IPv4 octet run, a date) is weak, and NIST's minimum domain
  (10^6) made the old operator fall back to hashes; a table has no minimum;
- separation of duties: whoever masks (holding the HMAC key and the recipients' *public* keys) cannot unmask;
  only an identity holder can, and a leaked masking key reveals no value (FPE ciphertext under a leaked key does);
- the masked text carries no ciphertext at all: surrogates and tags are one-way.
The cost: the table is a second file to keep, and it must match the masked file (its SHA-256 is checked).
Age gives confidentiality, not origin: anyone with a recipient's public key can write a table, so protect the
integrity of stored files as you would the masked file itself (a forged table is no worse than an edited file).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path

from .common import ENTITIES, FORMATS, MaskingError

TABLE_SUFFIX = ".reverse.age"
TABLE_VERSION = 2
TABLE_SCHEME = "secquant-mask-reverse-table"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def encrypt_table(entries: Sequence[list], fmt: str, masked_name: str, masked_sha256: str,
                  recipients: Sequence[str]) -> bytes:
    """The age ciphertext of the table. `entries`: [record, location, start, end, TYPE, original] per value, with
    positions in the masked text. The plaintext never touches a disk."""
    import pyrage

    from ...security.keys import load_recipients

    doc = {"scheme": TABLE_SCHEME, "version": TABLE_VERSION, "format": fmt, "masked_file": masked_name,
           "masked_sha256": masked_sha256, "entries": list(entries)}
    return pyrage.encrypt(json.dumps(doc, ensure_ascii=False).encode("utf-8"), load_recipients(list(recipients)))


def decrypt_table(path: Path, identity: str | os.PathLike, passphrase: str | None = None) -> dict:
    """Decrypt and check a reverse table; refuse a wrong identity or a file that is not one."""
    import pyrage

    from ...security.keys import load_identities

    if not path.is_file():
        raise MaskingError(f"reverse table {path} does not exist; give the {TABLE_SUFFIX} file written when the data "
                           "was masked with --to (pass --table FILE)")
    ids = load_identities(identity, passphrase)
    try:
        plain = pyrage.decrypt(path.read_bytes(), ids)
    except Exception:
        raise MaskingError(f"wrong key: {path} cannot be decrypted with {identity} (it was encrypted to other "
                           "recipients, or its bytes were modified)") from None
    try:
        doc = json.loads(plain.decode("utf-8"))
        entries = doc["entries"]
        if (doc.get("scheme") != TABLE_SCHEME or doc.get("version") != TABLE_VERSION or doc.get("format") not in FORMATS
                or not isinstance(entries, list) or not isinstance(doc.get("masked_sha256"), str)):
            raise ValueError
        for e in entries:
            rec, _loc, a, b, t, orig = e
            if not (isinstance(rec, int) and isinstance(a, int) and isinstance(b, int) and 0 <= a <= b
                    and t in ENTITIES and isinstance(orig, str)):
                raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise MaskingError(f"{path} is not a secquant reverse table") from None
    return doc
