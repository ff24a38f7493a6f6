"""PII masking of calibration text: detect with Presidio's analyzer (offline), replace with Presidio's anonymizer.

Detection runs without any downloaded model: Presidio's AnalyzerEngine on a `spacy.blank("en")` tokenizer (no NER)
with Presidio's predefined pattern recognizers (email, phone via `phonenumbers`, credit card with Luhn, IBAN with its
checksum, IP, US SSN, UK NINO) plus pattern recognizers written here for what Presidio lacks: the French social
security number (NIR, with its key), a date of birth *in context* ("born on", "DOB:", ...), and names *in context*
only (after a title or a label such as "Name:"). No offline NER model exists here, so bare names in running text are
NOT found; PERSON is measured separately and is not one of the structured types.

Operators per entity type:
  mask  every character replaced by '*'
  tag   `<EMAIL_ADDRESS>`                                   (the default)
  hash  `<EMAIL_ADDRESS:9f2c...>`, keyed HMAC-SHA256: the same value gives the same pseudonym in every record
  fpe   FF3-1 format-preserving encryption (`ff3`): digits stay digits, letters stay letters, separators stay,
        check digits (Luhn, IBAN, NIR key) are recomputed so the output is well formed; reversible with the key
        (`unmask_value`, `unmask_file`, `secquant mask --reverse`). Values too short for FF3-1's minimum domain
        (e.g. "March 5, 1984": 5 digits) get the keyed hash instead, counted in the summary.
"""

from __future__ import annotations

import csv
import functools
import hashlib
import hmac
import json
import math
import os
import secrets
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import OutputExistsError, SecquantError

# Structured types: the recall bar (>= 0.99) applies to these.
STRUCTURED_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN",
                       "UK_NINO", "FR_NIR", "DATE_OF_BIRTH")
NAME_ENTITIES = ("PERSON",)
ENTITIES = STRUCTURED_ENTITIES + NAME_ENTITIES
OPERATORS = ("mask", "tag", "hash", "fpe")
DEFAULT_OPERATOR = "tag"
DEFAULT_SCORE_THRESHOLD = 0.3
FORMATS = ("jsonl", "csv", "text")
KEY_MIN_BYTES = 32
SPANS_SUFFIX = ".fpe-spans.json"
PERSON_NOTE = ("PERSON is found only in context (after a title such as 'Dr.' or a label such as 'Name:'); "
               "no offline NER model runs here, so bare names in running text are not detected")


class MaskingError(SecquantError):
    """Bad masking input, configuration or key."""


# ----------------------------------------------------------------------------------------------------------------
# keys


@dataclass(frozen=True)
class MaskKey:
    """Sub-keys derived (HKDF-SHA256) from one key file: one for HMAC pseudonyms, one for FF3-1."""

    hmac_key: bytes
    fpe_key: bytes

    @classmethod
    def from_bytes(cls, material: bytes) -> MaskKey:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        if len(material) < KEY_MIN_BYTES:
            raise MaskingError(f"the masking key has {len(material)} bytes; it needs at least {KEY_MIN_BYTES} random "
                               "bytes (create one with `secquant mask ... --key FILE --generate-key`)")

        def derive(info: bytes) -> bytes:
            return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(material)

        return cls(derive(b"secquant-mask-hmac-v1"), derive(b"secquant-mask-ff3-v1"))

    @property
    def key_id(self) -> str:
        """A public fingerprint (to refuse decrypting with the wrong key), not usable to derive the key."""
        return hmac.new(self.hmac_key, b"secquant-mask-key-id", hashlib.sha256).hexdigest()[:16]

    def __repr__(self) -> str:  # never print key material
        return "MaskKey(<secret>)"


def load_key(path: str | os.PathLike) -> MaskKey:
    """Read a key file (at least 32 random bytes; a trailing newline is ignored)."""
    p = Path(path)
    try:
        material = p.read_bytes()
    except FileNotFoundError:
        raise MaskingError(f"key file {p} does not exist; create one with `secquant mask ... --key {p} "
                           "--generate-key`") from None
    except OSError as e:
        raise MaskingError(f"cannot read key file {p}: {e.strerror}") from None
    return MaskKey.from_bytes(material.rstrip(b"\r\n"))


def generate_key(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Write a new random key file (64 hex characters, mode 0600)."""
    p = Path(path)
    if p.exists() and not overwrite:
        raise OutputExistsError(f"key file {p} exists; refusing to replace a key (data masked with it could no "
                                "longer be linked or decrypted)")
    _atomic_write_bytes(p, (secrets.token_hex(32) + "\n").encode(), mode=0o600)
    return p


def _as_key(key: MaskKey | str | os.PathLike | bytes | None) -> MaskKey | None:
    if key is None or isinstance(key, MaskKey):
        return key
    if isinstance(key, bytes):
        return MaskKey.from_bytes(key)
    return load_key(key)


# ----------------------------------------------------------------------------------------------------------------
# format-preserving encryption (FF3-1 from the `ff3` package)

_DIGITS = "0123456789"
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# Character classes encrypted separately, per entity type: digits stay digits, letters stay letters; but
# an email is encrypted as one alphanumeric run (its few digits are often too short to encrypt on their own).
_CLASSES_DEFAULT = (("d", _DIGITS), ("l", _LETTERS))
_CLASSES = {"EMAIL_ADDRESS": (("a", _DIGITS + _LETTERS),)}


def _kept(value: str, entity: str) -> set[int]:
    """Positions not encrypted: an IBAN's country code and check digits, a card's Luhn digit and a NIR's key
    (recomputed after encryption, so the output passes the same checksum as a real one), a UK NINO's letters
    (prefix and suffix, about 9 bits, not identifying on their own), a Corsican NIR department (2A/2B).
    The same positions are found in the ciphertext, so decryption keeps them too."""
    alnum = [i for i, ch in enumerate(value) if ch.isalnum()]
    digits = [i for i, ch in enumerate(value) if ch in _DIGITS]
    if entity == "IBAN_CODE":
        return set(alnum[:4])
    if entity == "CREDIT_CARD":
        return set(digits[-1:])
    if entity == "UK_NINO":
        return {i for i, ch in enumerate(value) if ch in _LETTERS}
    if entity == "FR_NIR":  # the Corsican department "2A"/"2B" as a whole, and the key
        corsica = {j for i, ch in enumerate(value) if ch in _LETTERS for j in (i, i - 1) if j >= 0}
        return corsica | set(digits[-2:])
    return set()


def _fix_checks(chars: list[str], entity: str) -> None:
    """Recompute the check digits `_kept` left out, from the (encrypted or decrypted) rest of the value."""
    from .pii_corpus import iban_check_digits, luhn_check_digit

    alnum = [i for i, ch in enumerate(chars) if ch.isalnum()]
    digits = [i for i, ch in enumerate(chars) if ch in _DIGITS]
    if entity == "CREDIT_CARD" and len(digits) > 1:
        chars[digits[-1]] = luhn_check_digit("".join(chars[i] for i in digits[:-1]))
    elif entity == "IBAN_CODE" and len(alnum) > 4:
        country = "".join(chars[i] for i in alnum[:2]).upper()
        check = iban_check_digits(country, "".join(chars[i] for i in alnum[4:]).upper())
        chars[alnum[2]], chars[alnum[3]] = check[0], check[1]
    elif entity == "FR_NIR" and len(alnum) == 15:
        body = "".join(chars[i] for i in alnum[:13]).upper().replace("2A", "19").replace("2B", "18")
        if body.isdigit():
            key = f"{97 - int(body) % 97:02d}"
            chars[alnum[13]], chars[alnum[14]] = key[0], key[1]


class _Fpe:
    """FF3-1 (`ff3` package) over each character class of a value separately (digits radix 10, letters radix 52).

    Separators and other characters stay in place, so a card number stays a grouped run of digits; check digits
    are left out and recomputed (`_kept`, `_fix_checks`). FF3-1 needs a
    domain of at least 10^6 values (6 digits, 4 letters): a value with a class too short to encrypt is not
    encrypted at all (fail closed: the caller replaces it with the keyed hash, which is not reversible). Long runs
    are split into chunks of at most maxLen, each with its own tweak. Tweaks (56 bits, FF3-1) are derived from the
    key, the entity type, the class and the chunk, so one value of one type always encrypts the same way.
    """

    def __init__(self, key: MaskKey) -> None:
        self._key = key.fpe_key
        self._ciphers: dict[tuple[str, str, int], Any] = {}

    def _cipher(self, entity: str, cls: str, alphabet: str, chunk: int):
        k = (entity, cls, chunk)
        c = self._ciphers.get(k)
        if c is None:
            from ff3 import FF3Cipher

            tweak = hmac.new(self._key, f"tweak|{entity}|{cls}|{chunk}".encode(), hashlib.sha256).digest()[:7]
            c = self._ciphers[k] = FF3Cipher.withCustomAlphabet(self._key.hex(), tweak.hex(), alphabet)
        return c

    @staticmethod
    def _bounds(radix: int) -> tuple[int, int]:
        return math.ceil(math.log(1_000_000) / math.log(radix)), 2 * math.floor(96 / math.log2(radix))

    def transform(self, value: str, entity: str, decrypt: bool = False) -> str | None:
        """The encrypted (or decrypted) value, or None when it is too short to encrypt."""
        kept = _kept(value, entity)
        plan = []
        for cls, alphabet in _CLASSES.get(entity, _CLASSES_DEFAULT):
            idx = [i for i, ch in enumerate(value) if ch in alphabet and i not in kept]
            lo, hi = self._bounds(len(alphabet))
            if 0 < len(idx) < lo:
                return None
            if idx:
                plan.append((cls, alphabet, idx, hi))
        if not plan:
            return None
        chars = list(value)
        for cls, alphabet, idx, hi in plan:
            n = len(idx)
            k = -(-n // hi)  # chunks, each between lo and hi long (n > hi implies n / k >= hi / 2 >= lo)
            cuts = [round(j * n / k) for j in range(k + 1)]
            for j in range(k):
                pos = idx[cuts[j]:cuts[j + 1]]
                seg = "".join(value[i] for i in pos)
                c = self._cipher(entity, cls, alphabet, j)
                res = c.decrypt(seg) if decrypt else c.encrypt(seg)
                for i, ch in zip(pos, res):
                    chars[i] = ch
        _fix_checks(chars, entity)
        return "".join(chars)


def _normalize_for_hash(entity: str, value: str) -> str:
    """Spellings of one value map to one pseudonym: '4111 1111 ...' and '4111-1111-...' are the same card."""
    if entity in ("CREDIT_CARD", "US_SSN", "FR_NIR", "PHONE_NUMBER", "IBAN_CODE", "UK_NINO"):
        return "".join(ch for ch in value if ch.isalnum()).upper()
    if entity == "EMAIL_ADDRESS":
        return value.strip().lower()
    return value.strip()


def _pseudonym(key: MaskKey, entity: str, value: str) -> str:
    digest = hmac.new(key.hmac_key, f"{entity}\x00{_normalize_for_hash(entity, value)}".encode(), hashlib.sha256)
    return f"<{entity}:{digest.hexdigest()[:16]}>"


# ----------------------------------------------------------------------------------------------------------------
# detection: Presidio AnalyzerEngine, offline


def _email_recognizer():
    import tldextract
    from presidio_analyzer.predefined_recognizers import EmailRecognizer

    # Presidio's email validator calls tldextract's default extractor, which downloads the public-suffix list.
    # Use the snapshot bundled with tldextract instead (no network, no cache directory).
    extractor = tldextract.TLDExtract(cache_dir=None, suffix_list_urls=(), fallback_to_snapshot=True)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str):
            return extractor(pattern_text).fqdn != ""

    return OfflineEmailRecognizer()


def _credit_card_recognizer():
    from presidio_analyzer import Pattern
    from presidio_analyzer.predefined_recognizers import CreditCardRecognizer

    # Presidio's pattern groups digits 4-4-4-4; American Express cards are printed 4-6-5. Luhn still validates.
    amex = Pattern("Amex 4-6-5 (weak)", r"\b3[47]\d{2}[- ]\d{6}[- ]\d{5}\b", 0.3)
    # A digit run right after '+' is an international phone number (+4915123451747), not a card that passes Luhn.
    patterns = [Pattern(p.name, r"(?<!\+)" + p.regex, p.score) for p in [*CreditCardRecognizer.PATTERNS, amex]]
    return CreditCardRecognizer(patterns=patterns)


def _phone_recognizer():
    from presidio_analyzer.predefined_recognizers import PhoneRecognizer

    class E164PhoneRecognizer(PhoneRecognizer):
        """Presidio's phone recognizer (python-phonenumbers), minus matches with more digits than E.164 allows
        (15): phonenumbers accepts e.g. a 16-digit voucher code '4974 4436 0081 0427' as a valid number."""

        def analyze(self, text, entities, nlp_artifacts=None):
            return [r for r in super().analyze(text, entities, nlp_artifacts)
                    if sum(ch.isdigit() for ch in text[r.start:r.end]) <= 15]

    return E164PhoneRecognizer()


def _fr_nir_valid(text: str) -> bool:
    s = "".join(ch for ch in text if ch.isalnum()).upper()
    if len(s) != 15:
        return False
    body, key = s[:13], s[13:]
    body = body.replace("2A", "19").replace("2B", "18")  # Corsica
    if not (body.isdigit() and key.isdigit()):
        return False
    return 97 - int(body) % 97 == int(key)


_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_MONTH_RE = (r"(?:jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|sep(?:t(?:ember)?)?"
             r"|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?)")


def _dob_valid(text: str) -> bool:
    import datetime

    import regex as re

    t = text.lower()
    nums = [int(x) for x in re.findall(r"\d+", t)]
    month_word = re.search(_MONTH_RE, t)
    candidates: list[tuple[int, int, int]] = []  # (year, month, day)
    if month_word:
        m = _MONTHS.index(month_word.group(0)[:3]) + 1
        if len(nums) == 2:
            d, y = (nums[0], nums[1]) if nums[1] > 31 else (nums[1], nums[0])
            candidates.append((y, m, d))
    elif len(nums) == 3:
        a, b, c = nums
        if a > 31:  # Y-M-D
            candidates.append((a, b, c))
        else:
            y = c if c >= 100 else (1900 + c if c > 30 else 2000 + c)
            candidates += [(y, a, b), (y, b, a)]  # M/D/Y or D/M/Y
    for y, m, d in candidates:
        try:
            datetime.date(y, m, d)
        except ValueError:
            continue
        if 1900 <= y <= datetime.date.today().year:
            return True
    return False


def _custom_recognizers(entities: Sequence[str]) -> list:
    from presidio_analyzer import Pattern, PatternRecognizer

    recs = []
    if "FR_NIR" in entities:
        # Presidio has no French NIR recognizer; written here: sex, year, month, department (2A/2B), commune,
        # order, and the key 97 - (number mod 97), which validates the match.
        class FrNirRecognizer(PatternRecognizer):
            def validate_result(self, pattern_text: str):
                return _fr_nir_valid(pattern_text)

        recs.append(FrNirRecognizer(
            supported_entity="FR_NIR", name="FrNirRecognizer",
            patterns=[Pattern("NIR (weak)", r"\b[12] ?\d{2} ?(?:0[1-9]|1[0-2]|[2-9]\d) ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3}"
                                            r" ?\d{2}\b", 0.3)],
            context=["nir", "insee", "sécurité", "securite", "sociale"]))
    if "DATE_OF_BIRTH" in entities:
        # A date is PII here only as a date of birth: the context must come right before it (variable-width
        # lookbehind of the `regex` module that Presidio uses), and the date must be a real past date.
        ctx = (r"(?<=\b(?:born(?:\s+on)?|birth\s*date|date\s+of\s+birth|d\.?o\.?b\.?|birthday(?:\s+is)?)"
               r"\s*(?:is\s+|was\s+)?[:\-]?\s*)")
        dates = [
            r"\d{4}-\d{1,2}-\d{1,2}",
            r"\d{1,2}[/.\-]\d{1,2}[/.\-](?:\d{4}|\d{2})",
            _MONTH_RE + r"\.?\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4}",
            r"\d{1,2}(?:st|nd|rd|th)?\s+(?:of\s+)?" + _MONTH_RE + r"\.?,?\s+\d{4}",
        ]

        class DateOfBirthRecognizer(PatternRecognizer):
            def validate_result(self, pattern_text: str):
                return _dob_valid(pattern_text)

        recs.append(DateOfBirthRecognizer(
            supported_entity="DATE_OF_BIRTH", name="DateOfBirthRecognizer",
            patterns=[Pattern(f"DOB {i}", ctx + r"\b" + d + r"\b", 0.5) for i, d in enumerate(dates)]))
    if "PERSON" in entities:
        # No NER model runs offline here, so names are found only in context: after a title or a label.
        # (?-i:...) keeps the capitalization test case-sensitive under Presidio's global IGNORECASE flag.
        name = r"(?-i:[A-Z][a-z]+(?:[ \-'][A-Z][a-z]+){0,2})"
        title_ctx = r"(?<=\b(?-i:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\.?\s+)"
        label_ctx = (r"(?<=\b(?:name|patient|customer|client|contact|employee|signed(?:\s+by)?|dear|regards|"
                     r"sincerely|from|attn)\s*[:,]?\s*)")
        recs.append(PatternRecognizer(
            supported_entity="PERSON", name="PersonInContextRecognizer",
            patterns=[Pattern("name after title", title_ctx + name + r"\b", 0.6),
                      Pattern("name after label", label_ctx + name + r"\b", 0.5)]))
    return recs


def _predefined_recognizers(entities: Sequence[str]) -> list:
    from presidio_analyzer.predefined_recognizers import (
        IbanRecognizer,
        IpRecognizer,
        UkNinoRecognizer,
        UsSsnRecognizer,
    )

    make: dict[str, Callable[[], Any]] = {
        "EMAIL_ADDRESS": _email_recognizer, "PHONE_NUMBER": _phone_recognizer, "CREDIT_CARD": _credit_card_recognizer,
        "IBAN_CODE": IbanRecognizer, "IP_ADDRESS": IpRecognizer, "US_SSN": UsSsnRecognizer,
        # Presidio's NINO context words are phrases ("national insurance"), which never equal a single token.
        "UK_NINO": lambda: UkNinoRecognizer(context=["nino", "ni", "national", "insurance"]),
    }
    return [make[e]() for e in entities if e in make]


_LEMMA_COMPONENT = "secquant_lower_lemma"


def _blank_nlp_engine():
    """A Presidio spaCy NLP engine on `spacy.blank("en")`: tokens only, no model download, no NER.

    Lemmas are the lower-cased tokens, so Presidio's context enhancer ("ssn", "phone", "iban", ... near a match)
    still works without a lemmatizer model.
    """
    import spacy
    from presidio_analyzer.nlp_engine import SpacyNlpEngine
    from spacy.language import Language

    if _LEMMA_COMPONENT not in Language.factories:
        def lower_lemma(doc):
            for tok in doc:
                tok.lemma_ = tok.lower_
            return doc

        Language.component(_LEMMA_COMPONENT, func=lower_lemma)

    class BlankSpacyNlpEngine(SpacyNlpEngine):
        def load(self) -> None:
            nlp = spacy.blank("en")
            nlp.add_pipe(_LEMMA_COMPONENT)
            self.nlp = {"en": nlp}

    engine = BlankSpacyNlpEngine(models=[{"lang_code": "en", "model_name": "blank:en"}])
    engine.load()
    return engine


@functools.lru_cache(maxsize=4)
def _analyzer(entities: tuple[str, ...]):
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry

    registry = RecognizerRegistry(recognizers=_predefined_recognizers(entities) + _custom_recognizers(entities),
                                  supported_languages=["en"])
    return AnalyzerEngine(registry=registry, nlp_engine=_blank_nlp_engine(), supported_languages=["en"])


@functools.lru_cache(maxsize=1)
def _anonymizer():
    from presidio_anonymizer import AnonymizerEngine

    return AnonymizerEngine()


# Overlaps are resolved by how specific a detector is before its score: a checksum (IBAN mod 97, NIR key, Luhn) or
# a strict format beats a context-boosted heuristic (phonenumbers accepts many digit runs, e.g. a dotted IPv4
# address or the digits of a NINO, as a valid number somewhere, and "number"/"mobile" nearby lift its score).
PRIORITY = ("IBAN_CODE", "FR_NIR", "EMAIL_ADDRESS", "CREDIT_CARD", "IP_ADDRESS", "DATE_OF_BIRTH", "UK_NINO", "US_SSN",
            "PHONE_NUMBER", "PERSON")


def _resolve(results: list) -> list:
    """One entity per character: drop results that overlap a kept one (more specific type, then higher score, then
    longer span). Presidio's anonymizer resolves conflicts by score alone; doing it here first also makes the
    counts in the summary exactly the spans that were replaced."""
    kept: list = []
    for r in sorted(results, key=lambda r: (PRIORITY.index(r.entity_type), -r.score, -(r.end - r.start), r.start)):
        if all(r.end <= k.start or r.start >= k.end for k in kept):
            kept.append(r)
    return sorted(kept, key=lambda r: r.start)


# ----------------------------------------------------------------------------------------------------------------
# the masker


def parse_operators(spec: Mapping[str, str] | Iterable[str] | None) -> dict[str, str]:
    """{'CREDIT_CARD': 'fpe'} or ['CREDIT_CARD=fpe', 'default=hash'] -> an operator for every entity type."""
    ops = {e: DEFAULT_OPERATOR for e in ENTITIES}
    if spec is None:
        return ops
    items = list(spec.items()) if isinstance(spec, Mapping) else []
    if not isinstance(spec, Mapping):
        for s in spec:
            if "=" not in s:
                raise MaskingError(f"--operator {s!r}: write TYPE=OP, e.g. CREDIT_CARD=fpe (OP one of "
                                   f"{', '.join(OPERATORS)})")
            t, o = s.split("=", 1)
            items.append((t, o))
    default = [o for t, o in items if t.strip().lower() == "default"]
    for o in default:
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
    if op not in OPERATORS:
        raise MaskingError(f"unknown operator {op!r} for {entity}; use one of {', '.join(OPERATORS)}")


class Masker:
    """Detects PII in strings and replaces it with an operator per entity type; counts what it did.

    `operators`: {TYPE: OP} or ['TYPE=OP', 'default=OP']; `key`: a key file path, bytes or MaskKey (needed for
    hash and fpe); `entities`: types to detect (default: all of ENTITIES); `score_threshold`: Presidio score
    below which a match is ignored (after context enhancement).
    """

    def __init__(self, operators: Mapping[str, str] | Iterable[str] | None = None,
                 key: MaskKey | str | os.PathLike | bytes | None = None, entities: Iterable[str] | None = None,
                 score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> None:
        self.entities = tuple(ENTITIES if entities is None else entities)
        for e in self.entities:
            if e not in ENTITIES:
                raise MaskingError(f"unknown entity type {e!r}; known types: {', '.join(ENTITIES)}")
        if not self.entities:
            raise MaskingError("no entity types to detect")
        if not 0.0 <= score_threshold <= 1.0:
            raise MaskingError(f"score threshold {score_threshold} must be between 0 and 1")
        self.operators = {e: o for e, o in parse_operators(operators).items() if e in self.entities}
        self.key = _as_key(key)
        needs_key = sorted({o for o in self.operators.values() if o in ("hash", "fpe")})
        if needs_key and self.key is None:
            raise MaskingError(f"operator(s) {', '.join(needs_key)} need a key: pass --key FILE (at least "
                               f"{KEY_MIN_BYTES} random bytes; --generate-key creates one)")
        self.score_threshold = score_threshold
        self._fpe = _Fpe(self.key) if self.key is not None else None
        self.counts: Counter[str] = Counter()
        self.fpe_fallback: Counter[str] = Counter()
        self.strings = 0
        self.strings_with_pii = 0
        self._analyzer = _analyzer(self.entities)
        self._anonymizer = _anonymizer()
        self._op_configs = {e: self._op_config(e, o) for e, o in self.operators.items()}

    def _op_config(self, entity: str, op: str):
        from presidio_anonymizer.entities import OperatorConfig

        if op == "tag":
            return OperatorConfig("replace", {"new_value": f"<{entity}>"})
        if op == "mask":
            return OperatorConfig("mask", {"masking_char": "*", "chars_to_mask": 1 << 30, "from_end": False})
        if op == "hash":
            return OperatorConfig("custom", {"lambda": lambda v, e=entity: _pseudonym(self.key, e, v)})
        return OperatorConfig("custom", {"lambda": lambda v, e=entity: self._encrypt(e, v)})

    def _encrypt(self, entity: str, value: str) -> str:
        out = self._fpe.transform(value, entity)
        if out is None:  # too short for FF3-1's minimum domain: not reversible, but never left in clear
            self.fpe_fallback[entity] += 1
            return _pseudonym(self.key, entity, value)
        return out

    def analyze(self, text: str) -> list:
        """Presidio RecognizerResults (entity_type, start, end, score), overlaps resolved."""
        if not text:
            return []
        res = self._analyzer.analyze(text=text, language="en", entities=list(self.entities),
                                     score_threshold=self.score_threshold)
        return _resolve(res)

    def mask(self, text: str, results: list | None = None) -> tuple[str, list[tuple[int, int, str]]]:
        """(masked text, FPE spans [(start, end, TYPE)] in the masked text). `results`: reuse an analysis."""
        self.strings += 1
        results = self.analyze(text) if results is None else results
        if not results:
            return text, []
        self.strings_with_pii += 1
        self.counts.update(r.entity_type for r in results)
        # No merging of same-type neighbours ("4111... 5500..."): each value keeps its own pseudonym and count.
        engine = self._anonymizer.anonymize(text=text, analyzer_results=results, operators=self._op_configs,
                                            merge_entities_with_spaces=False)
        spans = []
        if self._fpe is not None:
            for item in engine.items:
                if self.operators.get(item.entity_type) == "fpe" and not _is_pseudonym(item.text, item.entity_type):
                    spans.append((item.start, item.end, item.entity_type))
        return engine.text, sorted(spans)

    def summary(self) -> dict:
        """Counts per type and operators; no raw PII."""
        from importlib.metadata import version

        return {
            "strings_scanned": self.strings,
            "strings_with_pii": self.strings_with_pii,
            "entities": {e: self.counts.get(e, 0) for e in self.entities},
            "total_found": sum(self.counts.values()),
            "operators": dict(self.operators),
            "fpe_fallback_to_hash": {e: n for e, n in self.fpe_fallback.items() if n},
            "score_threshold": self.score_threshold,
            "detector": {
                "engine": f"presidio-analyzer {version('presidio-analyzer')}",
                "nlp": "spacy.blank('en') tokenizer, no NER model (offline)",
                "person": PERSON_NOTE if "PERSON" in self.entities else "not detected",
            },
        }


def _is_pseudonym(text: str, entity: str) -> bool:
    return text.startswith(f"<{entity}:") and text.endswith(">") and len(text) == len(entity) + 19


def mask_texts(texts: Iterable[str], operators: Mapping[str, str] | Iterable[str] | None = None,
               key: MaskKey | str | os.PathLike | bytes | None = None, entities: Iterable[str] | None = None,
               score_threshold: float = DEFAULT_SCORE_THRESHOLD) -> tuple[list[str], dict]:
    """Mask a list of strings: returns (masked strings, summary dict)."""
    m = Masker(operators, key, entities, score_threshold)
    out = []
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise MaskingError(f"item {i} is a {type(t).__name__}, not a string")
        out.append(m.mask(t)[0])
    s = m.summary()
    s["records"] = len(out)
    return out, s


def unmask_value(value: str, entity_type: str, key: MaskKey | str | os.PathLike | bytes) -> str:
    """Decrypt one FPE-masked value of `entity_type` with the key it was masked with."""
    k = _as_key(key)
    if k is None:
        raise MaskingError("unmasking needs the key the data was masked with (--key FILE)")
    if entity_type not in ENTITIES:
        raise MaskingError(f"unknown entity type {entity_type!r}; known types: {', '.join(ENTITIES)}")
    out = _Fpe(k).transform(value, entity_type, decrypt=True)
    if out is None:
        raise MaskingError(f"this {entity_type} value is too short to have been format-preserving encrypted")
    return out


# ----------------------------------------------------------------------------------------------------------------
# files


def _atomic_write_bytes(path: Path, data: bytes, mode: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _AtomicFiles:
    """Temp files next to their targets; all renamed into place on commit, all removed on error."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []

    def open(self, target: Path, newline: str | None = None):
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        self.pending.append((Path(tmp), target))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; outputs get the usual permissions (keys stay 0600)
        return os.fdopen(fd, "w", encoding="utf-8", newline=newline)

    def commit(self) -> None:
        for tmp, target in self.pending:
            os.replace(tmp, target)
        self.pending = []

    def abort(self) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)
        self.pending = []


def detect_format(path: Path, fmt: str | None) -> str:
    if fmt is not None:
        if fmt not in FORMATS:
            raise MaskingError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv",):
        return "csv"
    if suffix in (".txt", ".text", ""):
        return "text"
    raise MaskingError(f"cannot tell the format of {path} from its suffix {suffix!r}; pass --format "
                       f"{'|'.join(FORMATS)}")


def _open_input(path: Path):
    """Binary: lines are decoded one by one, so a decoding error names its line."""
    if not path.exists():
        raise MaskingError(f"input file {path} does not exist")
    if path.is_dir():
        raise MaskingError(f"input {path} is a directory; give a JSONL, CSV or text file")
    try:
        return open(path, "rb")
    except OSError as e:
        raise MaskingError(f"cannot read {path}: {e.strerror}") from None


def _lines(f, path: Path) -> Iterator[tuple[int, str]]:
    for lineno, raw in enumerate(f, 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise MaskingError(f"{path} line {lineno}: not UTF-8 text; convert the file to UTF-8") from None
        if lineno == 1 and line.startswith("\ufeff"):  # byte-order mark
            line = line[1:]
        yield lineno, line


def _walk_strings(obj: Any, path: tuple, fn: Callable[[str, tuple], str]) -> Any:
    if isinstance(obj, str):
        return fn(obj, path)
    if isinstance(obj, dict):
        return {k: _walk_strings(v, path + (k,), fn) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_walk_strings(v, path + (i,), fn) for i, v in enumerate(obj)]
    return obj


def _jsonl_records(f, path: Path) -> Iterator[tuple[int, str, dict | None]]:
    """(line number, the raw line, parsed object or None for a blank line)."""
    for lineno, line in _lines(f, path):
        body = line.rstrip("\r\n")
        if not body.strip():
            yield lineno, line, None
            continue
        try:
            obj = json.loads(body)
        except json.JSONDecodeError as e:
            raise MaskingError(f"{path} line {lineno}: not valid JSON ({e.msg} at column {e.colno}); fix or remove "
                               "the line") from None
        if not isinstance(obj, dict):
            raise MaskingError(f"{path} line {lineno}: expected a JSON object per line, got "
                               f"{type(obj).__name__}")
        yield lineno, line, obj


def _check_outputs(paths: Sequence[Path | None], src: Path, overwrite: bool) -> None:
    for p in paths:
        if p is None:
            continue
        if p.resolve() == src.resolve():
            raise MaskingError(f"output {p} is the input file; write the masked data to a new file")
        if p.exists() and not overwrite:
            raise OutputExistsError(f"{p} exists; pass --overwrite to replace it")
        if p.is_dir():
            raise MaskingError(f"output {p} is a directory; give a file name")


def mask_file(src: str | os.PathLike, out: str | os.PathLike, *, fmt: str | None = None,
              fields: Sequence[str] | None = None, operators: Mapping[str, str] | Iterable[str] | None = None,
              key: MaskKey | str | os.PathLike | bytes | None = None, entities: Iterable[str] | None = None,
              score_threshold: float = DEFAULT_SCORE_THRESHOLD, summary_path: str | os.PathLike | None = None,
              spans_path: str | os.PathLike | None = None, overwrite: bool = False,
              progress: Callable[[str, int | None], Callable[[int], None]] | None = None) -> dict:
    """Mask a JSONL, CSV or text file into `out` (written atomically) and return the summary dict.

    JSONL: every string in each object (or only under the top-level `fields`); CSV: every column (or `fields`);
    text: every line. When some type uses fpe, the positions of the encrypted values are written to `spans_path`
    (default OUT + '.fpe-spans.json'; positions only, no values) so that `unmask_file` can decrypt them.
    """
    src, out = Path(src), Path(out)
    fmt = detect_format(src, fmt)
    fields = list(fields) if fields else None
    if fields and fmt == "text":
        raise MaskingError("--field applies to JSONL and CSV; a text file is masked line by line")
    masker = Masker(operators, key, entities, score_threshold)
    uses_fpe = "fpe" in masker.operators.values()
    spans_p = (Path(spans_path) if spans_path else out.with_name(out.name + SPANS_SUFFIX)) if uses_fpe else None
    summary_p = Path(summary_path) if summary_path else None
    _check_outputs([out, spans_p, summary_p], src, overwrite)

    files = _AtomicFiles()
    spans: list[list] = []
    seen_fields: set[str] = set()
    records = 0
    with ExitStack() as stack:
        fin = stack.enter_context(_open_input(src))
        advance = progress(f"masking {src.name}", None) if progress else (lambda n: None)
        try:
            fout = files.open(out, newline="")
            if fmt == "jsonl":
                for _, line, obj in _jsonl_records(fin, src):
                    if obj is None:
                        fout.write(line)
                        continue
                    rec = records
                    records += 1
                    changed = []

                    def fn(s: str, p: tuple, rec=rec, changed=changed) -> str:
                        masked, sp = masker.mask(s)
                        spans.extend([rec, list(p), a, b, t] for a, b, t in sp)
                        if masked != s:
                            changed.append(p)
                        return masked

                    if fields is None:
                        obj = _walk_strings(obj, (), fn)
                    else:
                        for k in fields:
                            if k in obj:
                                seen_fields.add(k)
                                obj[k] = _walk_strings(obj[k], (k,), fn)
                    # a record without PII is copied byte for byte; a masked one is re-serialized
                    body = line.rstrip("\r\n")
                    fout.write((json.dumps(obj, ensure_ascii=False) if changed else body) + line[len(body):])
                    advance(1)
                if fields:
                    missing = [k for k in fields if k not in seen_fields]
                    if missing and records:
                        raise MaskingError(f"--field {', '.join(missing)}: no record has this field; check the "
                                           "name (JSONL top-level keys)")
            elif fmt == "csv":
                records = _mask_csv(fin, fout, src, fields, masker, spans, advance)
            else:
                for lineno, line in _lines(fin, src):
                    body = line.rstrip("\r\n")
                    masked, sp = masker.mask(body)
                    spans.extend([records, None, a, b, t] for a, b, t in sp)
                    fout.write(masked + line[len(body):])
                    records += 1
                    advance(1)
            fout.close()
            summary = masker.summary()
            summary.update({"format": fmt, "records": records, "input": str(src), "output": str(out),
                            "fields": ("every line" if fmt == "text" else fields or "every string field"),
                            "fpe_spans": str(spans_p) if spans_p else None})
            if spans_p is not None:
                with files.open(spans_p) as f:
                    json.dump({"version": 1, "format": fmt, "masked_file": out.name, "key_id": masker.key.key_id,
                               "spans": spans}, f)
            if summary_p is not None:
                with files.open(summary_p) as f:
                    json.dump(summary, f, indent=2)
                    f.write("\n")
            files.commit()
        except BaseException:
            files.abort()
            raise
    return summary


def _mask_csv(fin, fout, src: Path, fields, masker: Masker, spans: list, advance) -> int:
    reader = csv.reader((line for _, line in _lines(fin, src)), strict=True)
    writer = csv.writer(fout)
    try:
        header = next(reader)
    except StopIteration:
        raise MaskingError(f"{src} is empty; a CSV file needs a header row") from None
    except csv.Error as e:
        raise MaskingError(f"{src} line 1: malformed CSV ({e})") from None
    if fields:
        missing = [k for k in fields if k not in header]
        if missing:
            raise MaskingError(f"--field {', '.join(missing)}: not a column of {src} (columns: {', '.join(header)})")
    cols = [i for i, h in enumerate(header) if fields is None or h in fields]
    writer.writerow(header)
    rec = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise MaskingError(f"{src} line {reader.line_num}: malformed CSV ({e})") from None
        if len(row) != len(header):
            raise MaskingError(f"{src} line {reader.line_num}: {len(row)} fields, the header has {len(header)}; "
                               "fix the row (quote values that contain commas)")
        for i in cols:
            masked, sp = masker.mask(row[i])
            row[i] = masked
            spans.extend([rec, header[i], a, b, t] for a, b, t in sp)
        writer.writerow(row)
        rec += 1
        advance(1)
    return rec


def unmask_file(src: str | os.PathLike, out: str | os.PathLike, key: MaskKey | str | os.PathLike | bytes, *,
                spans_path: str | os.PathLike | None = None, overwrite: bool = False) -> dict:
    """Decrypt the FPE values of a file written by `mask_file` (positions from its spans file); atomic.

    Returns {"records": N, "decrypted": {TYPE: count}}. Values masked with other operators stay masked.
    """
    src, out = Path(src), Path(out)
    k = _as_key(key)
    if k is None:
        raise MaskingError("--reverse needs the key the data was masked with (--key FILE)")
    spans_p = Path(spans_path) if spans_path else src.with_name(src.name + SPANS_SUFFIX)
    if not spans_p.exists():
        raise MaskingError(f"spans file {spans_p} does not exist; --reverse needs the positions written when the "
                           "file was masked with fpe (pass --spans FILE)")
    try:
        meta = json.loads(spans_p.read_text(encoding="utf-8"))
        fmt, spans = meta["format"], meta["spans"]
        if meta.get("version") != 1 or fmt not in FORMATS or not isinstance(spans, list):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise MaskingError(f"{spans_p} is not a secquant fpe spans file") from None
    if meta.get("key_id") != k.key_id:
        raise MaskingError(f"wrong key: {src} was masked with a different key (key id {meta.get('key_id')}, this "
                           f"key {k.key_id}); give the key file used for masking")
    _check_outputs([out], src, overwrite)
    fpe = _Fpe(k)
    by_loc: dict[tuple, list] = {}
    for s in spans:
        try:
            rec, loc, a, b, t = s
            if not (isinstance(rec, int) and isinstance(a, int) and isinstance(b, int) and t in ENTITIES):
                raise ValueError
        except (ValueError, TypeError):
            raise MaskingError(f"{spans_p} is not a secquant fpe spans file (bad entry {s!r:.80})") from None
        by_loc.setdefault((rec, json.dumps(loc)), []).append((a, b, t))
    with_spans = {rec for rec, _ in by_loc}
    counts: Counter[str] = Counter()

    def restore(text: str, rec: int, loc) -> str:
        items = by_loc.get((rec, json.dumps(loc)))
        if not items:
            return text
        chars = text
        for a, b, t in items:
            if t not in ENTITIES or not (0 <= a < b <= len(chars)):
                raise MaskingError(f"{spans_p} does not match {src} (record {rec}); was the file edited?")
            plain = fpe.transform(chars[a:b], t, decrypt=True)
            if plain is None:
                raise MaskingError(f"{spans_p} does not match {src} (record {rec}); was the file edited?")
            chars = chars[:a] + plain + chars[b:]
            counts[t] += 1
        return chars

    files = _AtomicFiles()
    records = 0
    with _open_input(src) as fin:
        try:
            fout = files.open(out, newline="")
            if fmt == "jsonl":
                for _, line, obj in _jsonl_records(fin, src):
                    if obj is None:
                        fout.write(line)
                        continue
                    body = line.rstrip("\r\n")
                    ending = line[len(body):]
                    if records in with_spans:
                        obj = _walk_strings(obj, (), lambda s, p, r=records: restore(s, r, list(p)))
                        body = json.dumps(obj, ensure_ascii=False)
                    fout.write(body + ending)
                    records += 1
            elif fmt == "csv":
                reader = csv.reader((line for _, line in _lines(fin, src)), strict=True)
                writer = csv.writer(fout)
                try:
                    header = next(reader)
                    writer.writerow(header)
                    for row in reader:
                        writer.writerow([restore(v, records, h) for h, v in zip(header, row)])
                        records += 1
                except (StopIteration, csv.Error) as e:
                    raise MaskingError(f"{src}: malformed CSV ({e})") from None
            else:
                for _, line in _lines(fin, src):
                    body = line.rstrip("\r\n")
                    fout.write(restore(body, records, None) + line[len(body):])
                    records += 1
            fout.close()
            if sum(counts.values()) != len(spans):
                raise MaskingError(f"{spans_p} names {len(spans)} values but {sum(counts.values())} were found in "
                                   f"{src}; is it the file that was masked?")
            files.commit()
        except BaseException:
            files.abort()
            raise
    return {"records": records, "decrypted": dict(counts)}
