"""PII masking of calibration text that fails closed: every pattern match is masked.

- `detection`: Presidio's AnalyzerEngine (offline, `spacy.blank("en")`, no NER) with fail-closed pattern
  recognizers: checks (Luhn, IBAN mod 97, NIR key, assigned phone ranges, public suffixes, real dates) only score
  and rank overlaps, never let a match through; names are found in context only.
- `operators`: keys, the mask / tag / hash / surrogate operators, the Masker.
- `reverse`: the age-encrypted reverse table that makes masking reversible (it replaced FF3-1 `fpe`).
- `files`: JSONL, CSV and text files in and out, atomically; `legacy_ff3`: restoring files masked with `fpe`.
"""

from __future__ import annotations

from .common import (DEFAULT_OPERATOR, ENTITIES, FORMATS, KEY_MIN_BYTES, NAME_ENTITIES, OPERATORS, PERSON_NOTE,
    STRUCTURED_ENTITIES, WITHDRAWN_OPERATORS, MaskingError
)
from .files import detect_format, mask_file, unmask_file, unmask_legacy_ff3
from .operators import (Masker, MaskKey, Replacement, generate_key, load_key, mask_texts, parse_operators, pseudonym,
    surrogate
)
from .reverse import TABLE_SUFFIX


def unmask_value(value: str, entity_type: str, key) -> str:
    """Decrypt one value masked with the withdrawn FF3-1 `fpe` operator (legacy files only)."""
    from .legacy_ff3 import LegacyFf3
    from .operators import read_key_material

    if entity_type not in ENTITIES:
        raise MaskingError(f"unknown entity type {entity_type!r}; known types: {', '.join(ENTITIES)}")
    out = LegacyFf3(key if isinstance(key, bytes) else read_key_material(key)).decrypt(value, entity_type)
    if out is None:
        raise MaskingError(f"this {entity_type} value is too short to have been FF3-1 encrypted")
    return out


__all__ = [
    "DEFAULT_OPERATOR", "ENTITIES", "FORMATS", "KEY_MIN_BYTES", "NAME_ENTITIES", "OPERATORS", "PERSON_NOTE",
    "STRUCTURED_ENTITIES", "TABLE_SUFFIX", "WITHDRAWN_OPERATORS", "MaskKey", "Masker", "MaskingError", "Replacement",
    "detect_format", "generate_key", "load_key", "mask_file", "mask_texts", "parse_operators", "pseudonym",
    "surrogate", "unmask_file", "unmask_legacy_ff3", "unmask_value",
]
