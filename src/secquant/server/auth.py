"""API keys: `sq_<key id>_<secret>`; only a keyed hash of the whole key is stored.

The key id (12 hex digits, not secret) finds the client's row with one indexed lookup. The secret
is 256 random bits, so no guessing can succeed and a slow password hash buys nothing: the stored
record is HMAC-SHA-256 of the key under the server secret (see `secret.py`), compared in constant
time. Checking a wrong key costs about a microsecond, the same whether or not its id exists.

Records made by earlier versions (argon2id, 64 MiB and t=3 each) are still accepted: only a
well-formed key whose id names a live client with such a record is checked with argon2id (at most
`LEGACY_SLOTS` at once, so a flood cannot take the memory; at most `LEGACY_FAILURES_PER_MINUTE`
failed checks per key id, so one who learnt a key id cannot keep argon2 busy from many addresses),
and on its first success the record is replaced by the HMAC one. Unknown, revoked and malformed
keys never reach argon2.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
import secrets
import threading
from enum import Enum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from .budgets import FailureLimiter

log = logging.getLogger("secquant.server")
KEY_PREFIX = "sq"
HMAC_SCHEME = "hmac-sha256"
LEGACY_SLOTS = 2  # concurrent argon2id verifications of old records (64 MiB each)
LEGACY_WAIT_S = 1.0  # a request waits at most this long for a slot, then fails (closed)
LEGACY_FAILURES_PER_MINUTE = 10  # per key id; past it the id's legacy record is not checked for a while
_KEY_RE = re.compile(r"^sq_([0-9a-f]{12})_([A-Za-z0-9_-]{43})$")


def new_key() -> tuple[str, str]:
    """(key id, full key) for a new client key."""
    key_id = secrets.token_hex(6)
    return key_id, f"{KEY_PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"


def key_id_of(key: str) -> str | None:
    """The id part of a well-formed key, else None."""
    m = _KEY_RE.match(key)
    return m.group(1) if m else None


def is_legacy(stored: str) -> bool:
    """True for a record made by an earlier version (an argon2 hash)."""
    return stored.startswith("$argon2")


class Verdict(Enum):
    """The outcome of checking a key against its stored record."""

    BAD = "bad"
    OK = "ok"
    OK_REHASH = "ok, stored as a legacy argon2id record: replace it"


class KeyHasher:
    """HMAC-SHA-256 records under one server secret; legacy argon2id records verified, never made."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise ValueError("the server secret must be at least 32 bytes")
        self._secret = secret
        # Names the secret in each record (a hash of it, which reveals nothing about it), so a record
        # made under another secret (a lost or replaced secret file) is recognized as such.
        self.secret_id = hashlib.sha256(b"secquant server secret id\0" + secret).hexdigest()[:16]
        self._legacy = PasswordHasher()  # verify() reads the cost parameters from each stored hash
        self._slots = threading.BoundedSemaphore(LEGACY_SLOTS)
        self._legacy_failures = FailureLimiter(LEGACY_FAILURES_PER_MINUTE)
        self._count = threading.Lock()
        self.legacy_verifications = 0  # argon2id runs so far (tests and operators can watch it)

    def _mac(self, key: str) -> str:
        return hmac.new(self._secret, key.encode("utf-8", "surrogatepass"), hashlib.sha256).hexdigest()

    def hash(self, key: str) -> str:
        return f"{HMAC_SCHEME}${self.secret_id}${self._mac(key)}"

    def other_secret(self, stored: str) -> bool:
        """True for an HMAC record made under a different server secret."""
        return stored.startswith(HMAC_SCHEME + "$") and not stored.startswith(f"{HMAC_SCHEME}${self.secret_id}$")

    def verify(self, key: str, stored: str | None) -> Verdict:
        """Whether `key` matches the stored record (None: no live client holds its id; the HMAC is
        computed all the same, so the time does not depend on it)."""
        mac = self._mac(key)
        if stored is None:
            return Verdict.BAD
        if stored.startswith(HMAC_SCHEME + "$"):
            _, sid, want = stored.split("$", 2)
            if sid != self.secret_id:
                log.warning("a key record was made under another server secret (lost or replaced secret file?): "
                            "rotate that client's key")
                return Verdict.BAD
            return Verdict.OK if hmac.compare_digest(mac, want) else Verdict.BAD
        if is_legacy(stored):
            key_id = key_id_of(key) or "?"
            if self._legacy_failures.retry_after(key_id) > 0:
                log.warning("key id %s: too many failed checks against its legacy record; refusing for now", key_id)
                return Verdict.BAD
            if self._verify_legacy(key, stored):
                return Verdict.OK_REHASH
            self._legacy_failures.failed(key_id)
            return Verdict.BAD
        return Verdict.BAD  # an unknown record format: fail closed

    def _verify_legacy(self, key: str, stored: str) -> bool:
        if not self._slots.acquire(timeout=LEGACY_WAIT_S):
            log.warning("argon2id verification slots busy: refusing a key with a legacy record")
            return False
        try:
            with self._count:
                self.legacy_verifications += 1
            return self._legacy.verify(stored, key)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
        finally:
            self._slots.release()
