"""Masking keys and operators, and the Masker that detects and replaces PII in strings.

Operators per entity type:
  mask       every character replaced by '*'
  tag        `<EMAIL_ADDRESS>` (the default)
  hash       `<EMAIL_ADDRESS:9f2c...>`: keyed HMAC-SHA256, the same value gives the same pseudonym in every record
  surrogate  a keyed, format-preserving pseudonym: digits stay digits, letters stay letters, separators stay, check
             digits (Luhn, IBAN, NIR key) are recomputed and dates stay dates, so calibration text keeps its shape.
             Derived with HMAC-SHA256 from the value: one-way, consistent across records.

Reversal is not a property of an operator: `mask_file(..., recipients=[...])` writes the replaced values, by
position, to a reverse table encrypted with age to those recipients, whatever the operator (see `reverse.py`).
This replaces the FF3-1 `fpe` operator (withdrawn by NIST); why not FF1 instead is written in `reverse.py`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import regex as re

from ...errors import OutputExistsError
from . import checks
from .common import DEFAULT_OPERATOR, ENTITIES, KEY_MIN_BYTES, OPERATORS, PERSON_NOTE, WITHDRAWN_OPERATORS, MaskingError

# ----------------------------------------------------------------------------------------------------------------
# keys


def _hkdf(material: bytes, info: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)


@dataclass(frozen=True)
class MaskKey:
    """Sub-keys derived (HKDF-SHA256) from one key file: HMAC pseudonyms (`hash`) and surrogates."""

    hmac_key: bytes
    surrogate_key: bytes

    @classmethod
    def from_bytes(cls, material: bytes) -> MaskKey:
        if len(material) < KEY_MIN_BYTES:
            raise MaskingError(f"the masking key has {len(material)} bytes; it needs at least {KEY_MIN_BYTES} random "
                               "bytes (create one with `secquant mask ... --key FILE --generate-key`)")
        # "secquant-mask-hmac-v1": the same derivation as before FF3-1 was dropped, so `hash` pseudonyms match.
        return cls(_hkdf(material, b"secquant-mask-hmac-v1"), _hkdf(material, b"secquant-mask-surrogate-v1"))

    @property
    def key_id(self) -> str:
        """A public fingerprint (to refuse the wrong key), not usable to derive the key."""
        return hmac.new(self.hmac_key, b"secquant-mask-key-id", hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:  # never print key material
        return "MaskKey(<secret>)"


def read_key_material(path: str | os.PathLike) -> bytes:
    """The bytes of a key file (a trailing newline is ignored)."""
    p = Path(path)
    try:
        material = p.read_bytes()
    except FileNotFoundError:
        raise MaskingError(f"key file {p} does not exist; create one with `secquant mask ... --key {p} "
                           "--generate-key`") from None
    except OSError as e:
        raise MaskingError(f"cannot read key file {p}: {e.strerror}") from None
    return material.rstrip(b"\r\n")


def load_key(path: str | os.PathLike) -> MaskKey:
    """Read a key file (at least 32 random bytes)."""
    return MaskKey.from_bytes(read_key_material(path))


def generate_key(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a new random key file (64 hex characters, mode 0600)."""
    from ...artifact.fsutil import atomic_file

    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(f"key file {p} exists; refusing to replace a key (data masked with it could no "
                                "longer be linked to new pseudonyms)")
    with atomic_file(p, mode=0o600) as tmp:
        tmp.write_bytes((secrets.token_hex(32) + "\n").encode())
    return p


def as_key(key: MaskKey | str | os.PathLike | bytes | None) -> MaskKey | None:
    if key is None or isinstance(key, MaskKey):
        return key
    if isinstance(key, bytes):
        return MaskKey.from_bytes(key)
    return load_key(key)


# ----------------------------------------------------------------------------------------------------------------
# pseudonyms


def _normalize(entity: str, value: str) -> str:
    """Spellings of one value map to one pseudonym: '4111 1111 ...' and '4111-1111-...' are the same card."""
    if entity in ("CREDIT_CARD", "US_SSN", "FR_NIR", "PHONE_NUMBER", "IBAN_CODE", "UK_NINO"):
        return "".join(ch for ch in value if ch.isalnum()).upper()
    if entity == "EMAIL_ADDRESS":
        return value.strip().lower()
    return value.strip()


def pseudonym(key: MaskKey, entity: str, value: str) -> str:
    """`<TYPE:16 hex>`, keyed HMAC-SHA256 of the normalized value."""
    digest = hmac.new(key.hmac_key, f"{entity}\x00{_normalize(entity, value)}".encode(), hashlib.sha256)
    return f"<{entity}:{digest.hexdigest()[:16]}>"


class _Stream:
    """Uniform choices from HMAC-SHA256 in counter mode (a deterministic, keyed random stream per value)."""

    def __init__(self, key: bytes, seed: str) -> None:
        self._key, self._seed, self._buf, self._n = key, seed.encode(), b"", 0

    def _byte(self) -> int:
        if not self._buf:
            self._buf = hmac.new(self._key, self._seed + self._n.to_bytes(8, "big"), hashlib.sha256).digest()
            self._n += 1
        b, self._buf = self._buf[0], self._buf[1:]
        return b

    def below(self, n: int) -> int:
        limit = 256 - 256 % n  # rejection sampling: no modulo bias
        while True:
            b = self._byte()
            if b < limit:
                return b % n


_LOWER, _UPPER, _HEX = "abcdefghijklmnopqrstuvwxyz", "ABCDEFGHIJKLMNOPQRSTUVWXYZ", "0123456789abcdef"


def _kept(value: str, entity: str) -> set[int]:
    """Positions a surrogate keeps: an IBAN's country code (its check digits are recomputed), a NINO's letters
    (format letters, a few bits), a NIR's sex digit and Corsican department (2A/2B), month names and the letters of
    a phone extension ('ext.')."""
    alnum = [i for i, ch in enumerate(value) if ch.isalnum()]
    if entity == "IBAN_CODE":
        return set(alnum[:2])
    if entity in ("UK_NINO", "DATE_OF_BIRTH", "PHONE_NUMBER"):
        return {i for i, ch in enumerate(value) if ch.isalpha()}
    if entity == "FR_NIR":
        return {j for i, ch in enumerate(value) if ch.isalpha() for j in (i, i - 1) if j >= 0} | set(alnum[:1])
    return set()


def _fix_checks(chars: list[str], entity: str) -> None:
    """Recompute check digits so that a surrogate card, IBAN or NIR is well formed."""
    alnum = [i for i, ch in enumerate(chars) if ch.isalnum()]
    digits = [i for i, ch in enumerate(chars) if ch in checks.DIGITS]
    if entity == "CREDIT_CARD" and len(digits) > 1:
        chars[digits[-1]] = checks.luhn_check_digit("".join(chars[i] for i in digits[:-1]))
    elif entity == "IBAN_CODE" and len(alnum) > 4:
        country = "".join(chars[i] for i in alnum[:2]).upper()
        if country.isascii() and country.isalpha():
            check = checks.iban_check_digits(country, "".join(chars[i] for i in alnum[4:]).upper())
            chars[alnum[2]], chars[alnum[3]] = check[0], check[1]
    elif entity == "FR_NIR" and len(alnum) == 15:
        key = checks.nir_key("".join(chars[i] for i in alnum[:13]))
        if key is not None:
            chars[alnum[13]], chars[alnum[14]] = key[0], key[1]


def _surrogate_date(value: str, s: _Stream) -> str:
    """Another plausible date written the same way (numbers keep at least their width). When day and month could be
    read either way round (D/M/Y or M/D/Y), both are drawn from 1-12 so the date is valid under both readings."""
    nums = list(re.finditer(r"\d+", value))
    year, month, day = 1930 + s.below(76), 1 + s.below(12), 1 + s.below(28)
    if re.search(checks.MONTH_RE, value, re.IGNORECASE):
        roles = ["year" if len(m.group()) == 4 else "day" for m in nums]
    elif len(nums) == 3 and len(nums[0].group()) == 4:
        roles = ["year", "month", "day"]
    elif len(nums) == 3:
        day = 1 + s.below(12)
        roles = ["month", "day", "year" if len(nums[2].group()) > 2 else "year2"]
    else:
        roles = ["day"] * len(nums)
    new = {"year": str(year), "year2": f"{year % 100:02d}", "month": str(month), "day": str(day)}
    out, last = [], 0
    for m, role in zip(nums, roles):
        out += [value[last:m.start()], new[role].zfill(len(m.group()))]
        last = m.end()
    out.append(value[last:])
    return "".join(out)


def surrogate(key: MaskKey, entity: str, value: str) -> str:
    """A keyed, format-preserving pseudonym of `value` (see the module docstring); never equal to `value`."""
    for attempt in range(8):
        s = _Stream(key.surrogate_key, f"{entity}\x00{_normalize(entity, value).lower()}\x00{attempt}")
        if entity == "DATE_OF_BIRTH":
            out = _surrogate_date(value, s)
        elif entity == "IP_ADDRESS" and re.fullmatch(r"\d{1,3}(?:\.\d{1,3}){3}", value):
            out = ".".join(str(s.below(254) + 1) for _ in range(4))
        else:
            kept = _kept(value, entity)
            chars = list(value)
            hexdigits = entity == "IP_ADDRESS"
            upper_hex = any(ch in "ABCDEF" for ch in value)
            for i, ch in enumerate(value):
                if i in kept or not ch.isalnum():
                    continue
                if hexdigits:
                    c = _HEX[s.below(16)] if ch.lower() in _HEX else ch
                    chars[i] = c.upper() if upper_hex else c
                elif ch.isdigit():
                    chars[i] = str(s.below(10))
                else:
                    c = _LOWER[s.below(26)]
                    chars[i] = c.upper() if ch.isupper() else c
            _fix_checks(chars, entity)
            out = "".join(chars)
        if out != value:
            return out
    return pseudonym(key, entity, value)  # a value with no character to vary (e.g. '1.1.1.1' eight times over)


# ----------------------------------------------------------------------------------------------------------------
# the masker


def parse_operators(spec: Mapping[str, str] | Iterable[str] | None) -> dict[str, str]:
    """{'CREDIT_CARD': 'surrogate'} or ['CREDIT_CARD=surrogate', 'default=hash'] -> an operator per entity type."""
    ops = {e: DEFAULT_OPERATOR for e in ENTITIES}
    if spec is None:
        return ops
    items = list(spec.items()) if isinstance(spec, Mapping) else []
    if not isinstance(spec, Mapping):
        for s in spec:
            if "=" not in s:
                raise MaskingError(f"--operator {s!r}: write TYPE=OP, e.g. CREDIT_CARD=surrogate (OP one of "
                                   f"{', '.join(OPERATORS)})")
            t, o = s.split("=", 1)
            items.append((t, o))
    for t, o in items:
        if t.strip().lower() == "default":
            _check_op(o.strip(), "default")
            ops = {e: o.strip() for e in ENTITIES}
    for t, o in items:
        t, o = t.strip().upper(), o.strip()
        if t == "DEFAULT":
            continue
        if t not in ENTITIES:
            raise MaskingError(f"unknown entity type {t!r}; known types: {', '.join(ENTITIES)} (or 'default')")
        _check_op(o, t)
        ops[t] = o
    return ops


def _check_op(op: str, entity: str) -> None:
    if op.lower() in WITHDRAWN_OPERATORS:
        raise MaskingError(f"operator {op!r} ({entity}) was FF3-1 format-preserving encryption, which NIST has "
                           "withdrawn; mask with 'surrogate' (format-preserving, keyed) and pass --to RECIPIENT to "
                           "keep an age-encrypted reverse table. Files masked with fpe are still restored by "
                           "`secquant unmask --legacy-ff3`")
    if op not in OPERATORS:
        raise MaskingError(f"unknown operator {op!r} for {entity}; use one of {', '.join(OPERATORS)}")


@dataclass(frozen=True)
class Replacement:
    """One replaced value: [start, end) in the masked string, its type, the original text and whether a check
    (checksum, assigned range, public suffix) passed; unchecked values are masked all the same."""

    start: int
    end: int
    entity_type: str
    original: str
    checked: bool


class Masker:
    """Detects PII in strings and replaces every match with an operator per entity type; counts what it did.

    `operators`: {TYPE: OP} or ['TYPE=OP', 'default=OP']; `key`: a key file path, bytes or MaskKey (needed for
    hash and surrogate); `entities`: types to detect (default: all of ENTITIES).
    """

    def __init__(self, operators: Mapping[str, str] | Iterable[str] | None = None,
                 key: MaskKey | str | os.PathLike | bytes | None = None,
                 entities: Iterable[str] | None = None) -> None:
        from .detection import analyzer

        self.entities = tuple(ENTITIES if entities is None else entities)
        for e in self.entities:
            if e not in ENTITIES:
                raise MaskingError(f"unknown entity type {e!r}; known types: {', '.join(ENTITIES)}")
        if not self.entities:
            raise MaskingError("no entity types to detect")
        self.operators = {e: o for e, o in parse_operators(operators).items() if e in self.entities}
        self.key = as_key(key)
        needs_key = sorted({o for o in self.operators.values() if o in ("hash", "surrogate")})
        if needs_key and self.key is None:
            raise MaskingError(f"operator(s) {', '.join(needs_key)} need a key: pass --key FILE (at least "
                               f"{KEY_MIN_BYTES} random bytes; --generate-key creates one)")
        self.counts: Counter[str] = Counter()
        self.unchecked: Counter[str] = Counter()
        self.strings = 0
        self.strings_with_pii = 0
        self._analyzer = analyzer(self.entities)

    def analyze(self, text: str) -> list:
        """Presidio RecognizerResults (entity_type, start, end, score): every match, overlaps resolved so that
        each matched character belongs to exactly one result."""
        from .detection import resolve

        if not text:
            return []
        res = self._analyzer.analyze(text=text, language="en", entities=list(self.entities), score_threshold=0.0)
        return resolve(res)

    def replace(self, entity: str, value: str) -> str:
        op = self.operators[entity]
        if op == "tag":
            return f"<{entity}>"
        if op == "mask":
            return "*" * len(value)
        assert self.key is not None  # checked in __init__
        if op == "hash":
            return pseudonym(self.key, entity, value)
        return surrogate(self.key, entity, value)

    def mask(self, text: str, results: list | None = None) -> tuple[str, list[Replacement]]:
        """(masked text, the replacements with their positions in the masked text). `results`: reuse an analysis."""
        from .detection import CHECKS, VALID_SCORE

        self.strings += 1
        results = self.analyze(text) if results is None else results
        if not results:
            return text, []
        self.strings_with_pii += 1
        # Written here rather than with Presidio's anonymizer: it merges and trims entities on its own rules, and
        # the spans replaced must be exactly the resolved ones (no character of a match left beside its mask).
        out, reps, last, shift = [], [], 0, 0
        for r in sorted(results, key=lambda r: r.start):
            value = text[r.start:r.end]
            new = self.replace(r.entity_type, value)
            out += [text[last:r.start], new]
            start = r.start + shift
            checked = r.score >= VALID_SCORE
            reps.append(Replacement(start, start + len(new), r.entity_type, value, checked))
            shift += len(new) - len(value)
            last = r.end
            self.counts[r.entity_type] += 1
            if not checked and r.entity_type in CHECKS:  # PERSON has no check to pass
                self.unchecked[r.entity_type] += 1
        out.append(text[last:])
        return "".join(out), reps

    def summary(self) -> dict:
        """Counts per type and operators; no raw PII."""
        from importlib.metadata import version

        return {
            "strings_scanned": self.strings,
            "strings_with_pii": self.strings_with_pii,
            "entities": {e: self.counts.get(e, 0) for e in self.entities},
            "total_found": sum(self.counts.values()),
            "masked_without_passing_check": {e: n for e, n in self.unchecked.items() if n},
            "operators": dict(self.operators),
            "detector": {
                "engine": f"presidio-analyzer {version('presidio-analyzer')}, fail-closed pattern recognizers",
                "policy": "every pattern match is masked; checks (checksums, assigned ranges, public suffixes) "
                          "only rank overlapping matches",
                "nlp": "spacy.blank('en') tokenizer, no NER model (offline)",
                "person": PERSON_NOTE if "PERSON" in self.entities else "not detected",
            },
        }


def mask_texts(texts: Iterable[str], operators: Mapping[str, str] | Iterable[str] | None = None,
               key: MaskKey | str | os.PathLike | bytes | None = None,
               entities: Iterable[str] | None = None) -> tuple[list[str], dict]:
    """Mask a list of strings: returns (masked strings, summary dict)."""
    m = Masker(operators, key, entities)
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise MaskingError(f"item {i} is a {type(t).__name__}, not a string")
        out.append(m.mask(t)[0])
    s = m.summary()
    s["records"] = len(out)
    return out, s
