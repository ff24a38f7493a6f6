"""Entity types, operators and the masking error: shared by detection, operators and files."""

from __future__ import annotations

from ...errors import SecquantError

# Structured types: the recall bar (>= 0.99, no partial leak) applies to these.
STRUCTURED_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "IP_ADDRESS", "US_SSN",
                       "UK_NINO", "FR_NIR", "DATE_OF_BIRTH")
NAME_ENTITIES = ("PERSON",)
ENTITIES = STRUCTURED_ENTITIES + NAME_ENTITIES
OPERATORS = ("mask", "tag", "hash", "surrogate")
DEFAULT_OPERATOR = "tag"
# The FF3-1 operator of secquant <= 0.x: refused for masking (NIST withdrew FF3 in the 2025 draft of SP 800-38G
# Rev. 1); files masked with it are still decrypted by `secquant unmask --legacy-ff3`.
WITHDRAWN_OPERATORS = ("fpe", "ff3")
FORMATS = ("jsonl", "csv", "text")
KEY_MIN_BYTES = 32
PERSON_NOTE = ("PERSON is found only in context (after a title such as 'Dr.' or a label such as 'Name:'); "
               "no offline NER model runs here, so bare names in running text are not detected")


class MaskingError(SecquantError):
    """Bad masking input, configuration or key."""
