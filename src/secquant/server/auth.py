"""API keys: `sq_<key id>_<secret>`; only an argon2id hash of the whole key is stored.

The key id (12 hex digits, not secret) finds the client's row with one indexed lookup, so a
request never scans hashes. The secret is 256 random bits. Unknown or revoked key ids are still
verified against a dummy argon2id hash, so a wrong key takes as long whether or not its id exists.
argon2id (RFC 9106) is deliberately slow; a verified key is remembered in memory by its SHA-256
digest (a fast, safe check for a 256-bit random secret) for as long as the stored hash stays the
same, so the slow hash runs once per key per server process, not once per request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

KEY_PREFIX = "sq"
_KEY_RE = re.compile(r"^sq_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


def new_key() -> tuple[str, str]:
    """(key id, full key) for a new client key."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key, else None."""
    m = _KEY_RE.match(key)
    return m.group(1) if m else None


class KeyHasher:
    """argon2id hashing and verification (argon2-cffi's defaults: RFC 9106 low-memory profile)."""

    def __init__(self, hasher: PasswordHasher | None = None) -> None:
        self.ph = hasher or PasswordHasher()
        self._dummy = self.ph.hash(secrets.token_urlsafe(32))
        self._verified: dict[str, tuple[str, bytes]] = {}  # key id -> (stored hash, sha256 of the key)
        self._lock = threading.Lock()

    def hash(self, key: str) -> str:
        return self.ph.hash(key)

    def verify(self, key: str, stored_hash: str | None, key_id: str | None = None) -> bool:
        """True if `key` matches `stored_hash`; with no stored hash (unknown id) the same work is done
        against a dummy hash and False returned."""
        digest = hashlib.sha256(key.encode()).digest()
        if stored_hash is not None and key_id is not None:
            with self._lock:
                hit = self._verified.get(key_id)
            if hit is not None and hit[0] == stored_hash and hmac.compare_digest(hit[1], digest):
                return True
        try:
            ok = self.ph.verify(stored_hash if stored_hash is not None else self._dummy, key)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            ok = False
        ok = ok and stored_hash is not None
        if ok and key_id is not None:
            with self._lock:
                self._verified[key_id] = (stored_hash, digest)
        return ok

    def forget(self, key_id: str) -> None:
        with self._lock:
            self._verified.pop(key_id, None)
