"""Decryption of files masked with the withdrawn FF3-1 `fpe` operator (secquant before this change): read only.

NIST's 2025 draft of SP 800-38G Rev. 1 withdraws FF3/FF3-1, and the `ff3` package calls itself educational, so
nothing is encrypted with it any more; files already masked with it stay restorable (`secquant unmask
--legacy-ff3`). The tweaks, character classes, kept positions and check-digit rules below are those the old
operator used, unchanged: any change would decrypt old files to garbage.
"""

from __future__ import annotations

import hashlib
import hmac
import math
from typing import Any

from . import checks
from .operators import MaskKey, _hkdf

SPANS_SUFFIX = ".fpe-spans.json"
SPANS_VERSION = 1

_DIGITS = "0123456789"
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
_CLASSES_DEFAULT = (("d", _DIGITS), ("l", _LETTERS))
_CLASSES = {"EMAIL_ADDRESS": (("a", _DIGITS + _LETTERS),)}


def _kept(value: str, entity: str) -> set[int]:
    alnum = [i for i, ch in enumerate(value) if ch.isalnum()]
    digits = [i for i, ch in enumerate(value) if ch in _DIGITS]
    if entity == "IBAN_CODE":
        return set(alnum[:4])
    if entity == "CREDIT_CARD":
        return set(digits[-1:])
    if entity == "UK_NINO":
        return {i for i, ch in enumerate(value) if ch in _LETTERS}
    if entity == "FR_NIR":
        corsica = {j for i, ch in enumerate(value) if ch in _LETTERS for j in (i, i - 1) if j >= 0}
        return corsica | set(digits[-2:])
    return set()


def _fix_checks(chars: list[str], entity: str) -> None:
    alnum = [i for i, ch in enumerate(chars) if ch.isalnum()]
    digits = [i for i, ch in enumerate(chars) if ch in _DIGITS]
    if entity == "CREDIT_CARD" and len(digits) > 1:
        chars[digits[-1]] = checks.luhn_check_digit("".join(chars[i] for i in digits[:-1]))
    elif entity == "IBAN_CODE" and len(alnum) > 4:
        country = "".join(chars[i] for i in alnum[:2]).upper()
        check = checks.iban_check_digits(country, "".join(chars[i] for i in alnum[4:]).upper())
        chars[alnum[2]], chars[alnum[3]] = check[0], check[1]
    elif entity == "FR_NIR" and len(alnum) == 15:
        key = checks.nir_key("".join(chars[i] for i in alnum[:13]))
        if key is not None:
            chars[alnum[13]], chars[alnum[14]] = key[0], key[1]


class LegacyFf3:
    """FF3-1 decryption with the key file the data was masked with."""

    def __init__(self, material: bytes) -> None:
        self.key_id = MaskKey.from_bytes(material).key_id
        self._key = _hkdf(material, b"secquant-mask-ff3-v1")
        self._ciphers: dict[tuple[str, str, int], Any] = {}

    def _cipher(self, entity: str, cls: str, alphabet: str, chunk: int):
        k = (entity, cls, chunk)
        c = self._ciphers.get(k)
        if c is None:
            from ff3 import FF3Cipher

            tweak = hmac.new(self._key, f"tweak|{entity}|{cls}|{chunk}".encode(), hashlib.sha256).digest()[:7]
            c = self._ciphers[k] = FF3Cipher.withCustomAlphabet(self._key.hex(), tweak.hex(), alphabet)
        return c

    def decrypt(self, value: str, entity: str) -> str | None:
        """The plaintext of one value, or None when it cannot have been encrypted (too short)."""
        kept = _kept(value, entity)
        plan = []
        for cls, alphabet in _CLASSES.get(entity, _CLASSES_DEFAULT):
            idx = [i for i, ch in enumerate(value) if ch in alphabet and i not in kept]
            radix = len(alphabet)
            lo, hi = math.ceil(math.log(1_000_000) / math.log(radix)), 2 * math.floor(96 / math.log2(radix))
            if 0 < len(idx) < lo:
                return None
            if idx:
                plan.append((cls, alphabet, idx, hi))
        if not plan:
            return None
        chars = list(value)
        for cls, alphabet, idx, hi in plan:
            n = len(idx)
            k = -(-n // hi)
            cuts = [round(j * n / k) for j in range(k + 1)]
            for j in range(k):
                pos = idx[cuts[j]:cuts[j + 1]]
                res = self._cipher(entity, cls, alphabet, j).decrypt("".join(value[i] for i in pos))
                for i, ch in zip(pos, res):
                    chars[i] = ch
        _fix_checks(chars, entity)
        return "".join(chars)
