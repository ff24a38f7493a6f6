"""PII detection fails closed: recall and no partial leak on a held-out corpus that shares no code with the masker,
each fail-open case of issue 14 item 9 built as a hostile input, overlap resolution, regex timeouts, and no false
positives on clean text."""

from __future__ import annotations

import ast
import inspect

import pytest

from secquant.audits import pii_corpus, pii_yardstick
from secquant.privacy.masking import STRUCTURED_ENTITIES, Masker, MaskingError, mask_texts
from secquant.privacy.masking import detection
from secquant.audits.pii_yardstick import make_holdout, score_masking

HOLDOUT_SEED = 14_09  # a fixed sample; bench/masking.py reports the 600-record corpus of the default seed


@pytest.fixture(scope="module")
def masker():
    return Masker()


@pytest.fixture(scope="module")
def holdout(masker):
    records, planted = make_holdout(300, seed=HOLDOUT_SEED)
    replaced = {(i, f): [(r.start, r.end, r.entity_type) for r in masker.analyze(rec[f])]
                for i, rec in enumerate(records) for f in ("text", "notes")}
    return records, planted, replaced


def _tags(texts: list[str]) -> list[str]:
    return mask_texts(texts)[0]


def test_yardstick_shares_no_code_with_the_masker():
    """The held-out corpus must not import what it measures, nor validators that would pick what to plant."""
    tree = ast.parse(inspect.getsource(pii_yardstick))
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module or "." for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {"." for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level}
    banned = ("secquant", ".", "presidio", "phonenumbers", "schwifty", "stdnum", "tldextract", "email_validator")
    assert not [m for m in imported if m.split(".")[0] in banned or m == "."], imported


def test_holdout_recall_per_type_and_no_partial_leak(holdout):
    _, planted, replaced = holdout
    stats = score_masking(planted, replaced)
    for t in STRUCTURED_ENTITIES:
        s = stats[t]
        assert s["planted"] >= 40, (t, s["planted"])
        assert s["recall"] >= 0.99, (t, s)
        assert s["in_clear"] == 0 and s["partial"] == 0, (t, s)
    # the corpus holds what issue 14 found leaking: it would catch a regression
    variants = {p.variant for p in planted}
    assert {"reserved", "private", "idn", "punycode", "quoted", "unassigned", "NL-all-digit"} <= {
        v.split("/")[0] for v in variants} | variants


def test_holdout_masked_output_keeps_no_planted_value(holdout):
    records, planted, _ = holdout
    m = Masker()
    out = {(i, f): m.mask(rec[f])[0] for i, rec in enumerate(records) for f in ("text", "notes")}
    left = [p.value for p in planted if p.value in out[(p.record, p.field)]]
    assert left == []
    assert sum(m.counts.values()) >= len(planted)


@pytest.mark.parametrize("text", [
    "Send it to jane.doe@mail.test today",  # no public suffix: the old validator dropped these
    "Send it to ops+alerts@corp.example today",
    "Send it to db-admin@svc.internal today",
    "Send it to Li.Nguyen@intranet.lan today",
    "Send it to kenji@münchen.example today",
    "Send it to kenji@xn--mnchen-3ya.de today",
    'Send it to "jane doe"@hr.example today',
])
def test_email_without_public_suffix_is_masked_whole(text):
    assert _tags([text]) == ["Send it to <EMAIL_ADDRESS> today"]


@pytest.mark.parametrize("text", [
    "Call +1 555-0123 now",  # NANP fictional range: phonenumbers calls it invalid
    "Call +1 (123) 456-7890 now",  # area codes never start with 1
    "Call +44 7700 900123 now",  # Ofcom drama range
    "Call +1 415 555 0132 ext. 204 now",  # the '+1 ' prefix and the extension are part of the value
    "Call (415) 555-0132 now",  # brackets
    "Call 0044 20 7946 0958 now",  # E.164 without '+'
    "Call 14155550132 now",
    "Call +33 (0)6 12 34 56 78 now",
    "Call 06.12.34.56.78 now",
    "Call 030/12345678 now",
    "Call (0)20 7946 0958 now",
    "Call 555-0123 now",  # a local number without its area code
])
def test_phone_in_unassigned_or_formatted_range_is_masked_whole(text):
    assert _tags([text]) == ["Call <PHONE_NUMBER> now"]


def _iban(country: str, bban: str) -> str:
    digits = "".join(str(int(c, 36)) for c in bban + country + "00")
    return f"{country}{98 - int(digits) % 97:02d}{bban}"


@pytest.mark.parametrize("iban", [_iban("NL", "12345678901234"), _iban("NL", "00000417164300"),
                                  _iban("GB", "123456" + "12345678" + "9012")])
def test_iban_with_all_digit_bank_code_is_masked(iban):
    grouped = " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
    assert _tags([f"IBAN {iban} ok", f"IBAN {grouped} ok", f"Bank {grouped.lower()} ok"]) == [
        "IBAN <IBAN_CODE> ok", "IBAN <IBAN_CODE> ok", "Bank <IBAN_CODE> ok"]


@pytest.mark.parametrize("text, expected", [
    ("IBAN DE89-3704-0044-0532-0130-00 ok", "IBAN <IBAN_CODE> ok"),
    ("card 4111.1111.1111.1111 ok", "card <CREDIT_CARD> ok"),
    ("born on the 5th of March, 1984", "born on <DATE_OF_BIRTH>"),
    ("NINO AB123456 ok", "NINO <UK_NINO> ok"),  # suffix letter left out
    ("ring me on 06 21 24 39 77, thanks", "ring me on <PHONE_NUMBER>, thanks"),  # 'on 06 21 24' is not a NINO
    ("account nl91 abna 0417 1643 00 by Monday", "account <IBAN_CODE> by Monday"),  # 'by' is not an IBAN group
])
def test_other_spellings(text, expected):
    assert _tags([text]) == [expected]


def test_failed_checks_score_but_never_let_a_match_through():
    texts = ["Voucher 4974 4436 0081 0427 expired.",  # card shape, fails Luhn
             "Ref DE88370400440532013000 here",  # IBAN shape, wrong check digits
             "NIR 1 84 12 76 451 089 47 ok",  # wrong key
             "DOB: 1984-02-30",  # no such date
             "SSN 000-12-3456 on file"]  # never issued
    out, s = mask_texts(texts)
    assert out == ["Voucher <CREDIT_CARD> expired.", "Ref <IBAN_CODE> here", "NIR <FR_NIR> ok", "DOB: <DATE_OF_BIRTH>",
                   "SSN <US_SSN> on file"]
    assert s["masked_without_passing_check"] == {"CREDIT_CARD": 1, "IBAN_CODE": 1, "FR_NIR": 1, "DATE_OF_BIRTH": 1,
                                                 "US_SSN": 1}
    # checks still rank overlaps: a valid card is a card, a valid IBAN keeps its type over a Luhn-valid run inside it
    m = Masker()
    assert [(r.entity_type, r.score) for r in m.analyze("Pay 4974 4436 0081 0424 now")] == [("CREDIT_CARD", 1.0)]


def test_overlaps_are_resolved_to_cover_every_matched_character():
    from presidio_analyzer import RecognizerResult

    # the beaten candidates reach further than the winner on both sides: their characters go to the winner
    cands = [RecognizerResult("IP_ADDRESS", 4, 15, 1.0), RecognizerResult("PHONE_NUMBER", 0, 15, 0.5),
             RecognizerResult("US_SSN", 10, 20, 0.3), RecognizerResult("EMAIL_ADDRESS", 30, 40, 1.0)]
    out = detection.resolve(cands)
    assert [(r.entity_type, r.start, r.end) for r in out] == [("IP_ADDRESS", 0, 20), ("EMAIL_ADDRESS", 30, 40)]
    # two winners bridged by a beaten candidate: the gap goes to the better-ranked one, nothing overlaps
    cands = [RecognizerResult("CREDIT_CARD", 0, 10, 1.0), RecognizerResult("US_SSN", 14, 20, 0.9),
             RecognizerResult("PHONE_NUMBER", 5, 18, 0.4)]
    out = detection.resolve(cands)
    assert [(r.entity_type, r.start, r.end) for r in out] == [("CREDIT_CARD", 0, 14), ("US_SSN", 14, 20)]
    # end to end: a name found in context inside an e-mail address does not leave the rest of the address
    assert _tags(["From: Sofia.doe@intranet.corp"]) == ["From: <EMAIL_ADDRESS>"]


def test_regex_timeout_refuses_instead_of_passing_text_through(monkeypatch):
    m = Masker(entities=["US_SSN"])
    text = "ssn 123-45-6789 " + "1 " * 200_000
    monkeypatch.setattr(detection, "MATCH_TIMEOUT_S", 1e-4)
    with pytest.raises(MaskingError, match="refusing to pass it through unmasked"):
        m.mask(text)


def test_no_false_positive_on_clean_text(masker):
    from secquant.models.encoder import builtin_sentences

    ev, cal = builtin_sentences()
    clean = ev + cal + pii_corpus.FILLER + pii_yardstick.FILLER
    found = [(s, [(r.entity_type, s[r.start:r.end]) for r in masker.analyze(s)]) for s in clean]
    assert [f for f in found if f[1]] == []
    assert len(clean) > 500


@pytest.fixture(scope="module")
def old_corpus(masker):
    """The validator-friendly generator's corpus (1,000 records), analyzed once."""
    records, planted = pii_corpus.make_corpus(1000, seed=0)
    found = {(i, f): [(r.start, r.end, r.entity_type) for r in masker.analyze(rec[f])]
             for i, rec in enumerate(records) for f in ("text", "notes")}
    return records, planted, found


def test_old_corpus_plants_valid_values():
    records, planted = pii_corpus.make_corpus(1000, seed=0)
    assert len(records) == 1000
    by_type: dict[str, list[str]] = {}
    for p in planted:
        by_type.setdefault(p.entity_type, []).append(p.value)
        assert records[p.record][p.field][p.start:p.end] == p.value
    assert set(by_type) == set(STRUCTURED_ENTITIES) | {"PERSON"}
    assert min(len(v) for v in by_type.values()) >= 200
    assert all(pii_corpus.luhn_valid(v) for v in by_type["CREDIT_CARD"])
    assert all(pii_corpus.iban_valid(v) for v in by_type["IBAN_CODE"])
    import phonenumbers

    intl = [v for v in by_type["PHONE_NUMBER"] if v.startswith("+")]
    assert len(intl) > 50 and all(phonenumbers.is_valid_number(phonenumbers.parse(v)) for v in intl)
    assert not pii_corpus.luhn_valid("4111 1111 1111 1112") and not pii_corpus.iban_valid("DE89370400440532013001")
    assert pii_corpus.make_corpus(5, seed=0) == pii_corpus.make_corpus(5, seed=0)
    assert pii_corpus.make_corpus(5, seed=0)[1] != pii_corpus.make_corpus(5, seed=1)[1]


def test_old_corpus_recall(old_corpus):
    """The validator-friendly corpus still passes. Its checksum-failing distractors are now masked too, so the old
    assertion precision >= 0.95 on it (which counted them as false positives) moved to clean text (test above)."""
    _, planted, found = old_corpus
    stats = pii_corpus.score_detection(planted, found, STRUCTURED_ENTITIES)
    for t in STRUCTURED_ENTITIES:
        assert stats[t]["planted"] >= 200, t
        assert stats[t]["recall"] >= 0.99, (t, stats[t])


def test_person_found_in_context_only(old_corpus):
    _, planted, found = old_corpus
    ctx, bare = [], []
    for p in planted:
        if p.entity_type == "PERSON":
            hit = any(t == "PERSON" and a <= p.start and b >= p.end for a, b, t in found[(p.record, p.field)])
            (ctx if p.context else bare).append(hit)
    assert len(ctx) > 100 and len(bare) > 50
    assert sum(ctx) / len(ctx) >= 0.95
    assert sum(bare) / len(bare) <= 0.1  # honest limit: no NER model offline, bare names are not detected
