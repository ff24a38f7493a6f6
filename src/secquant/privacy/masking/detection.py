"""PII detection that fails closed: every pattern match is masked; validation only scores and ranks.

Presidio's AnalyzerEngine runs offline (a `spacy.blank("en")` tokenizer, no NER) over the recognizers below. Its
predefined recognizers drop a match whose validation fails (an e-mail without a public suffix, a phone number
`phonenumbers` calls unassigned, an IBAN whose BBAN does not match the country's registered layout) and skip a
pattern whose regex times out: each of those lets PII through. Here a match is a match: a check (checksum, assigned
phone range, public suffix, plausible date) lifts its score to 1.0, Presidio's context words lift it further, and
the scores only decide which type an overlap gets. A regex timeout refuses the text instead of passing it on.

Overlaps: candidates are ranked (score, then how specific the type is, then length); the best non-overlapping ones
are kept and each is widened over the characters of the candidates it beat, so every character any pattern matched
is replaced: no '+1 ' prefix, extension or bracket of a value is left beside its mask.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import regex as re

from . import checks
from .common import MaskingError

MATCH_TIMEOUT_S = 5.0  # per pattern and string; past it the string is refused, not passed through
VALID_SCORE = 1.0

# One separator inside a phone number: a space, or - . / with optional spaces around it.
_SEP = r"(?:[ \u00a0]?[\-./][ \u00a0]?|[ \u00a0])"
_EXT = r"(?:[ \u00a0]?[,;]?[ \u00a0]?(?:ext\.?|extension|x|\#)[ \u00a0]?\d{1,6})?"
_PHONE_END = r"(?![\w@]|[\-./]\d)"
# Not inside a longer run of digit groups ('4576 0811 6050 1905' holds no phone number starting at '0811').
_NOT_IN_RUN = r"(?<![\w+\-./,])(?<!\d[ \u00a0\-./])"
# A D.M.Y or M/D/Y date (with a 19xx/20xx year) at the start of a digit run is a date, not a phone number.
_NOT_DATE = r"(?!\d{1,2}[./\-]\d{1,2}[./\-](?:19|20)\d{2}(?!\d))"
# Groups after a phone number's first digits: a separator then digits, a bracketed group ('(0)', '(415)'), or digits
# right after a bracket. Digits never follow digits across a group boundary, so a long digit run cannot be split
# in many ways (no catastrophic backtracking).
_GROUPS = r"(?:" + _SEP + r"\d{1,12}|" + _SEP + r"?\(\d{1,5}\)|(?<=\))\d{1,12})*"

# ISO 13616 country codes that issue IBANs (SWIFT IBAN registry): part of the pattern, not a validator.
IBAN_COUNTRIES = ("AD AE AL AT AZ BA BE BG BH BI BR BY CH CR CY CZ DE DJ DK DO EE EG ES FI FK FO FR GB GE GI GL GR GT "
                  "HN HR HU IE IL IQ IS IT JO KW KZ LB LC LI LT LU LV LY MC MD ME MK MN MR MT MU NI NL NO OM PK PL PS "
                  "PT QA RO RS RU SA SC SD SE SI SK SM SO ST SV TL TN TR UA VA VG XK YE").split()


@dataclass(frozen=True)
class Pattern:
    """A regex (group 'v' is the value when present), its score without a passing check, and an optional shape
    test on the matched value (part of the pattern, e.g. a digit count; never a validity check)."""

    name: str
    regex: str
    score: float
    shape: Callable[[str], bool] | None = None
    flags: int = re.IGNORECASE
    # shorter spans inside a match to consider as well (each scored by the type's check), e.g. an IBAN without a
    # word the pattern took for its last group; the whole match stays a candidate, so nothing is let through
    parts: Callable[[str], list[tuple[int, int]]] | None = None


def _iban_re(countries: Sequence[str], chars: str) -> str:
    sep = r"[ \u00a0\-]"
    return (r"(?:" + "|".join(countries) + r")\d{2}(?:(?:" + sep + f"[{chars}]{{4}}){{2,7}}(?:" + sep
            + f"[{chars}]{{1,4}})?|[{chars}]{{11,30}})")


def _group_prefixes(v: str) -> list[tuple[int, int]]:
    """An IBAN written in groups, less its last groups: [(0, end), ...]."""
    ends = [m.start() for m in re.finditer(r"[ \u00a0\-]", v)]
    return [(0, e) for e in ends if sum(ch.isalnum() for ch in v[:e]) >= 15]


def _ndigits(s: str) -> int:
    return sum(ch.isdigit() for ch in re.split(r"(?i)\s*[,;]?\s*(?:ext\.?|extension|x|#)\s*\d+$", s)[0])


def _patterns() -> dict[str, list[Pattern]]:
    from presidio_analyzer.predefined_recognizers import IpRecognizer

    # Not Presidio's e-mail regex: it needs a word character at both ends of the local part (no quoted local part).
    email_local = r"[\w!#$%&'*+/=?^`{|}~\-]+(?:\.[\w!#$%&'*+/=?^`{|}~\-]+)*"
    label = r"[\w](?:[\w\-]{0,61}[\w])?"
    email = (r"(?<![\w.!#$%&'*+/=?^`{|}~\-@])(?:\"[^\"\r\n@]{1,64}\"|" + email_local + r")@(?:\[[0-9a-f:.]+\]|"
             + label + r"(?:\.(?:" + label + r"))+)(?![\w\-]|\.\w)")
    # Presidio's IP regexes; an IPv4 inside a longer dotted run ('+41.19.245.49.51', '1.2.3.4.5') is not one
    ip = [Pattern(p.name, r"(?<!\d\.)" + p.regex + r"(?!\.\d)" if p.name == "IPv4" else p.regex, 0.6)
          for p in IpRecognizer.PATTERNS if p.name != "IPv6_unspecified"]
    nir_month = r"(?:0[1-9]|1[0-2]|[2-9]\d)"
    dob_ctx = (r"(?<=\b(?:born(?:\s+on)?|birth\s*date|date\s+of\s+birth|d\.?o\.?b\.?|birthday(?:\s+is)?)"
               r"\s*(?:is\s+|was\s+)?[:\-]?\s*)")
    dates = [r"\d{4}-\d{1,2}-\d{1,2}", r"\d{1,2}[/.\-]\d{1,2}[/.\-](?:\d{4}|\d{2})",
             checks.MONTH_RE + r"\.?\s+\d{1,2}(?:st|nd|rd|th)?,?\s+\d{4}",
             r"(?:the\s+)?\d{1,2}(?:st|nd|rd|th)?\s+(?:of\s+)?" + checks.MONTH_RE + r"\.?,?\s+\d{4}"]
    name = r"(?-i:[A-Z][a-z]+(?:[ \-'][A-Z][a-z]+){0,2})"
    title_ctx = r"(?<=\b(?-i:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\.?\s+)"
    label_ctx = (r"(?<=\b(?:name|patient|customer|client|contact|employee|signed(?:\s+by)?|dear|regards|"
                 r"sincerely|from|attn)\s*[:,]?\s*)")
    card_start = _NOT_IN_RUN
    return {
        "EMAIL_ADDRESS": [Pattern("email", email, 0.6)],
        "PHONE_NUMBER": [
            # +CC or 00/011 CC, then groups (a bracketed '(0)' or area code may follow): 7 to 15 digits
            Pattern("international", r"(?<![\w+])(?:\+|" + _NOT_IN_RUN + r"(?:00|011)[ \u00a0\-]?)\d{1,15}" + _GROUPS
                    + _EXT + _PHONE_END, 0.5, lambda v: 7 <= _ndigits(v) <= 15),
            # a bracketed area code: (415) 555-0132, (02) 9876 5432, 1 (415) 555-0132
            Pattern("bracketed area code", r"(?<![\w+)])(?:1[ \-.]?)?\(\d{2,5}\)[ \u00a0\-.]?\d{2,5}(?:" + _SEP
                    + r"\d{2,5}){0,3}" + _EXT + _PHONE_END, 0.45, lambda v: 8 <= _ndigits(v) <= 15),
            # a national number with its trunk 0 in groups: 020 7946 0958, 06 12 34 56 78, 030/12345678
            Pattern("trunk 0", _NOT_IN_RUN + _NOT_DATE + r"(?:0\d{1,5}|\(0\)[ \u00a0]?\d{1,5})(?:" + _SEP
                    + r"\d{2,8}){1,4}" + _EXT + _PHONE_END, 0.4, lambda v: 9 <= _ndigits(v) <= 13),
            # North American 3-3-4 (also Italian mobiles), one separator throughout, optional leading 1
            Pattern("3-3-4", _NOT_IN_RUN + r"(?:1([ \-.]))?[2-9]\d{2}([ \-.])\d{3}\2\d{4}" + _EXT + _PHONE_END, 0.4),
            # a North American local number (no area code): 555-0123, 555.0123
            Pattern("3-4", _NOT_IN_RUN + r"[2-9]\d{2}[\-.]\d{4}" + _EXT + _PHONE_END, 0.3),
            # Spanish 9-digit mobiles and landlines in 3-2-2-2
            Pattern("3-2-2-2", _NOT_IN_RUN + r"[6-9]\d{2}( )\d{2}\1\d{2}\1\d{2}" + _EXT + _PHONE_END, 0.35),
            # E.164 without '+': a bare run of 11 to 15 digits
            Pattern("bare E.164", _NOT_IN_RUN + r"\d{11,15}" + _EXT + _PHONE_END, 0.3),
        ],
        "CREDIT_CARD": [
            Pattern("grouped 4s", card_start + r"[1-9]\d{3}(?:[ \-.]\d{4}){2,3}(?:[ \-.]\d{1,3})?(?![\w]|[\-.]\d)",
                    0.4, lambda v: 13 <= _ndigits(v) <= 19),
            Pattern("4-6-5 / 4-6-4", card_start + r"3\d{3}([ \-])\d{6}\1\d{4,5}(?![\w]|[\-.]\d)", 0.4),
            Pattern("contiguous", card_start + r"[1-9]\d{12,18}(?![\w]|[\-.]\d)", 0.3),
        ],
        "IBAN_CODE": [
            # upper or lower case throughout; grouped in fours (space or dash), or contiguous
            Pattern("iban", r"(?<![\w])(?-i:" + _iban_re(IBAN_COUNTRIES, "A-Z0-9") + "|"
                    + _iban_re([c.lower() for c in IBAN_COUNTRIES], "a-z0-9") + r")(?![\w]|-\w)",
                    0.45, lambda v: 15 <= sum(ch.isalnum() for ch in v) <= 34, parts=_group_prefixes),
        ],
        "IP_ADDRESS": ip,
        "US_SSN": [
            Pattern("3-2-4", r"(?<![\w+\-./])\d{3}([ \-.])\d{2}\1\d{4}(?![\w]|[\-.]\d)", 0.5),
            Pattern("9 digits", r"(?<![\w+\-./,])\d{9}(?![\w]|[\-.,]\d)", 0.3),
        ],
        # Letters per HMRC's format (first not D F I Q U V, second not D F I O Q U V); all upper or all lower case.
        "UK_NINO": [
            # ('AB123456': some systems leave out the suffix letter; only upper case and contiguous, as words
            # such as 'on 06 21 24' would match otherwise)
            Pattern("nino", r"(?<![\w])(?-i:[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z](?: ?\d{2} ?\d{2} ?\d{2} ?[A-D]|\d{6})|"
                    r"[a-ceghj-pr-tw-z][a-ceghj-npr-tw-z] ?\d{2} ?\d{2} ?\d{2} ?[a-d])(?![\w])", 0.5),
        ],
        "FR_NIR": [
            Pattern("nir", r"(?<![\w])[1278] ?\d{2} ?" + nir_month + r" ?(?:\d{2}|2[AB]) ?\d{3} ?\d{3} ?\d{2}(?![\w])",
                    0.5),
        ],
        "DATE_OF_BIRTH": [Pattern(f"dob {i}", dob_ctx + r"\b" + d + r"\b", 0.6) for i, d in enumerate(dates)],
        "PERSON": [Pattern("name after title", title_ctx + name + r"\b", 0.6),
                   Pattern("name after label", label_ctx + name + r"\b", 0.5)],
    }


# A passing check lifts a match to VALID_SCORE.
CHECKS: dict[str, Callable[[str], bool]] = {
    "EMAIL_ADDRESS": checks.email_public_suffix, "PHONE_NUMBER": checks.phone_valid,
    "CREDIT_CARD": checks.luhn_valid, "IBAN_CODE": checks.iban_valid, "IP_ADDRESS": checks.ip_valid,
    "US_SSN": checks.ssn_plausible, "UK_NINO": checks.nino_plausible, "FR_NIR": checks.nir_valid,
    "DATE_OF_BIRTH": checks.date_plausible,
}
# Context words (Presidio's enhancer lifts a score when one is among the 5 words before a match).
CONTEXT = {
    "EMAIL_ADDRESS": ["email", "e-mail", "mail", "contact", "from", "to", "reply-to", "cc"],
    "PHONE_NUMBER": ["phone", "tel", "telephone", "call", "mobile", "cell", "fax", "ring", "hotline", "number"],
    "CREDIT_CARD": ["card", "visa", "mastercard", "amex", "pan", "credit", "debit", "charge", "paid"],
    "IBAN_CODE": ["iban", "account", "bank", "transfer", "wire", "pay"],
    "IP_ADDRESS": ["ip", "host", "client", "server", "from", "address", "blocked"],
    "US_SSN": ["ssn", "social", "security"],
    "UK_NINO": ["nino", "ni", "national", "insurance"],
    "FR_NIR": ["nir", "insee", "sécurité", "securite", "sociale", "vitale", "sécu"],
}
# Overlaps with equal scores go to the more specific type: a checksum or strict format beats a looser pattern.
PRIORITY = ("IBAN_CODE", "FR_NIR", "EMAIL_ADDRESS", "CREDIT_CARD", "IP_ADDRESS", "DATE_OF_BIRTH", "UK_NINO", "US_SSN",
            "PHONE_NUMBER", "PERSON")


def _recognizer(entity: str, patterns: Sequence[Pattern]):
    from presidio_analyzer import AnalysisExplanation, EntityRecognizer, RecognizerResult

    check = CHECKS.get(entity)

    class FailClosedRecognizer(EntityRecognizer):
        """Every match of every pattern is a result (score: the pattern's, or 1.0 when the check passes)."""

        def load(self) -> None:
            pass

        def analyze(self, text, entities, nlp_artifacts=None):
            out = []
            for p in patterns:
                try:
                    matches = list(_compiled(p.regex, p.flags).finditer(text, timeout=MATCH_TIMEOUT_S))
                except TimeoutError:
                    raise MaskingError(f"a {entity} pattern took longer than {MATCH_TIMEOUT_S:g} s on a string of "
                                       f"{len(text)} characters; refusing to pass it through unmasked (split the "
                                       "record into shorter strings)") from None
                for m in matches:
                    a, b = m.span("v") if "v" in m.groupdict() else m.span()
                    if a == b or (p.shape is not None and not p.shape(text[a:b])):
                        continue
                    spans = [(a, b)] + ([(a + i, a + j) for i, j in p.parts(text[a:b])] if p.parts else [])
                    for i, j in spans:
                        valid = check is not None and check(text[i:j])
                        if (i, j) != (a, b) and not valid:
                            continue
                        why = AnalysisExplanation(recognizer=self.name, original_score=p.score,
                                                  pattern_name=p.name, pattern=p.regex, validation_result=valid)
                        out.append(RecognizerResult(entity, i, j, VALID_SCORE if valid else p.score,
                                                    analysis_explanation=why, recognition_metadata={
                                                        RecognizerResult.RECOGNIZER_NAME_KEY: self.name,
                                                        RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: self.id}))
            return out

    return FailClosedRecognizer(supported_entities=[entity], name=f"FailClosed{entity.title().replace('_', '')}",
                                supported_language="en", context=CONTEXT.get(entity, []))


@functools.lru_cache(maxsize=None)
def _compiled(pattern: str, flags: int):
    return re.compile(pattern, flags | re.MULTILINE)


_LEMMA_COMPONENT = "secquant_lower_lemma"


def _blank_nlp_engine():
    """A Presidio spaCy NLP engine on `spacy.blank("en")`: tokens only, no model download, no NER.

    Lemmas are the lower-cased tokens, so Presidio's context enhancer ("ssn", "phone", "iban", ... near a match)
    works without a lemmatizer model.
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
def analyzer(entities: tuple[str, ...]):
    """A Presidio AnalyzerEngine with one fail-closed recognizer per entity type (cached per type set)."""
    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry

    pats = _patterns()
    registry = RecognizerRegistry(recognizers=[_recognizer(e, pats[e]) for e in entities],
                                  supported_languages=["en"])
    return AnalyzerEngine(registry=registry, nlp_engine=_blank_nlp_engine(), supported_languages=["en"])


def _rank(r) -> tuple:
    return (-r.score, PRIORITY.index(r.entity_type), -(r.end - r.start), r.start)


def resolve(results: list) -> list:
    """One entity per character, and every matched character covered.

    The best-ranked non-overlapping candidates are kept; then each group of overlapping candidates is covered
    entirely: a gap inside it (characters only a beaten candidate matched) goes to the better-ranked kept neighbour.
    """
    if not results:
        return []
    ranked = sorted(results, key=_rank)
    kept: list = []
    for r in ranked:
        if all(r.end <= k.start or r.start >= k.end for k in kept):
            kept.append(r)
    kept.sort(key=lambda r: r.start)
    # merged extents of all candidates (each contains at least one kept result)
    groups: list[list[int]] = []
    for r in sorted(results, key=lambda r: r.start):
        if groups and r.start < groups[-1][1]:
            groups[-1][1] = max(groups[-1][1], r.end)
        else:
            groups.append([r.start, r.end])
    for g0, g1 in groups:
        inside = [k for k in kept if g0 <= k.start and k.end <= g1]
        inside[0].start = g0
        inside[-1].end = g1
        for left, right in zip(inside, inside[1:]):
            if left.end < right.start:
                if _rank(left) <= _rank(right):
                    left.end = right.start
                else:
                    right.start = left.end
    return kept
