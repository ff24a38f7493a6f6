"""PII masking: recall on a seeded corpus with planted PII, no planted value left, operators, keys, FPE round trips,
file formats, bad input -> clear errors, CLI."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from secquant.errors import OutputExistsError
from secquant.privacy.masking import (
    ENTITIES,
    STRUCTURED_ENTITIES,
    Masker,
    MaskingError,
    _fr_nir_valid,
    generate_key,
    mask_file,
    mask_texts,
    unmask_file,
    unmask_value,
)
from secquant.privacy.pii_corpus import (
    iban_valid,
    luhn_valid,
    make_corpus,
    score_detection,
)

KEY = b"0123456789abcdef0123456789abcdef-test-key"
OTHER_KEY = b"another key of at least thirty-two bytes!!"
FIELDS = ("text", "notes")


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(1000, seed=0)


@pytest.fixture(scope="module")
def analyzed(corpus):
    """The corpus analyzed once: {(record, field): [RecognizerResult]} (reused by every operator test)."""
    records, _ = corpus
    m = Masker()
    return {(i, f): m.analyze(r[f]) for i, r in enumerate(records) for f in FIELDS}


def _found(analyzed):
    return {loc: [(r.start, r.end, r.entity_type) for r in res] for loc, res in analyzed.items()}


def test_corpus_plants_valid_values(corpus):
    records, planted = corpus
    assert len(records) == 1000
    by_type = {}
    for p in planted:
        by_type.setdefault(p.entity_type, []).append(p.value)
        assert records[p.record][p.field][p.start:p.end] == p.value
    assert set(by_type) == set(ENTITIES)
    assert min(len(v) for v in by_type.values()) >= 200
    assert all(luhn_valid(v) for v in by_type["CREDIT_CARD"])
    assert all(iban_valid(v) for v in by_type["IBAN_CODE"])
    import phonenumbers

    intl = [v for v in by_type["PHONE_NUMBER"] if v.startswith("+")]
    assert len(intl) > 50 and all(phonenumbers.is_valid_number(phonenumbers.parse(v)) for v in intl)
    assert not luhn_valid("4111 1111 1111 1112") and not iban_valid("DE89370400440532013001")
    # seeded: the same corpus every time, a different one for another seed
    assert make_corpus(5, seed=0) == make_corpus(5, seed=0)
    assert make_corpus(5, seed=0)[1] != make_corpus(5, seed=1)[1]


def test_recall_at_least_099_per_structured_type(corpus, analyzed):
    _, planted = corpus
    stats = score_detection(planted, _found(analyzed), ENTITIES)
    for t in STRUCTURED_ENTITIES:
        assert stats[t]["planted"] >= 200, t
        assert stats[t]["recall"] >= 0.99, (t, stats[t])
        assert stats[t]["precision"] >= 0.95, (t, stats[t])


def test_person_found_in_context_only(corpus, analyzed):
    _, planted = corpus
    found = _found(analyzed)
    ctx, bare = [], []
    for p in planted:
        if p.entity_type == "PERSON":
            hit = any(t == "PERSON" and a <= p.start and b >= p.end for a, b, t in found[(p.record, p.field)])
            (ctx if p.context else bare).append(hit)
    assert len(ctx) > 100 and len(bare) > 50
    assert sum(ctx) / len(ctx) >= 0.95
    assert sum(bare) / len(bare) <= 0.1  # honest limit: no NER model offline, bare names are not detected


def test_detector_types_and_refusals():
    m = Masker()

    def found(text):
        return [(text[r.start:r.end], r.entity_type) for r in m.analyze(text)]

    assert found("Voucher 4974 4436 0081 0427 expired.") == []  # fails Luhn; 16 digits: no phone either
    assert found("Pay 4974 4436 0081 0424 now") == [("4974 4436 0081 0424", "CREDIT_CARD")]
    assert found("Call +4915123451747 now") == [("+4915123451747", "PHONE_NUMBER")]  # not a card after '+'
    assert found("Ref DE88370400440532013000 here") == []  # IBAN check digits wrong
    assert found("IBAN DE89 3704 0044 0532 0130 00") == [("DE89 3704 0044 0532 0130 00", "IBAN_CODE")]
    assert found("NIR 1 84 12 76 451 089 46 ok") == [("1 84 12 76 451 089 46", "FR_NIR")]
    assert found("NIR 1 84 12 76 451 089 47 ok") == []  # wrong key
    assert found("Shipped on 2024-03-02, born on 1984-03-05.") == [("1984-03-05", "DATE_OF_BIRTH")]
    assert found("DOB: 1984-02-30") == []  # not a date
    assert found("Amex 3782 822463 10005") == [("3782 822463 10005", "CREDIT_CARD")]
    assert found("NI number AB 12 34 56 C") == [("AB 12 34 56 C", "UK_NINO")]
    assert found("Dr. Jane Smith and jane met") == [("Jane Smith", "PERSON")]


@pytest.mark.parametrize("op", ["mask", "tag", "hash", "fpe"])
def test_no_planted_value_left_for_each_operator(corpus, analyzed, op):
    records, planted = corpus
    m = Masker([f"default={op}"], key=KEY)
    masked = {(i, f): m.mask(r[f], analyzed[(i, f)])[0] for i, r in enumerate(records) for f in FIELDS}
    found = _found(analyzed)
    leaks = []
    for p in planted:
        detected = any(a <= p.start and b >= p.end for a, b, _ in found[(p.record, p.field)])
        if p.entity_type in STRUCTURED_ENTITIES or detected:
            out = masked[(p.record, p.field)]
            if p.value in out:
                leaks.append((p.entity_type, p.value))
    assert leaks == []
    s = m.summary()
    assert s["operators"] == {e: op for e in ENTITIES}
    assert s["entities"]["CREDIT_CARD"] >= 300 and s["total_found"] == sum(len(v) for v in analyzed.values())
    # the operator's form
    sample = next(p for p in planted if p.entity_type == "CREDIT_CARD" and " " in p.value
                  and all(a >= p.start for a, _, _ in found[(p.record, p.field)]))  # nothing masked before it
    out = masked[(sample.record, sample.field)]
    head = records[sample.record][sample.field][:sample.start]
    assert out.startswith(head)
    rest = out[len(head):]
    if op == "tag":
        assert rest.startswith("<CREDIT_CARD>")
    elif op == "mask":
        assert rest.startswith("*" * len(sample.value) + records[sample.record][sample.field][sample.end:][:1])
    elif op == "hash":
        assert re.match(r"<CREDIT_CARD:[0-9a-f]{16}>", rest)
    else:  # fpe: same shape (digits stay digits, spaces stay), different digits, decrypts back
        enc = rest[:len(sample.value)]
        assert enc != sample.value
        assert [c.isdigit() for c in enc] == [c.isdigit() for c in sample.value]
        assert [c for c in enc if not c.isdigit()] == [c for c in sample.value if not c.isdigit()]
        assert unmask_value(enc, "CREDIT_CARD", KEY) == sample.value


def test_hash_pseudonyms_are_keyed_and_consistent():
    texts = ["Mail jane.doe@example.com today.", "cc JANE.DOE@example.com please", "Mail bob@example.com today.",
             "Card 4111 1111 1111 1111 ok", "Card 4111-1111-1111-1111 ok", "Card 5500 0000 0000 0004 ok"]
    out, summary = mask_texts(texts, operators={"EMAIL_ADDRESS": "hash", "CREDIT_CARD": "hash"}, key=KEY)
    tags = [re.findall(r"<[A-Z_]+:[0-9a-f]{16}>", t) for t in out]
    assert all(len(t) == 1 for t in tags), out
    assert tags[0] == tags[1] and tags[0] != tags[2]  # same email in two records (case aside), another email
    assert tags[3] == tags[4] and tags[3] != tags[5]  # one card written two ways, another card
    out2, _ = mask_texts(texts, operators={"EMAIL_ADDRESS": "hash", "CREDIT_CARD": "hash"}, key=KEY)
    assert out2 == out  # deterministic across runs
    out3, _ = mask_texts(texts, operators={"EMAIL_ADDRESS": "hash", "CREDIT_CARD": "hash"}, key=OTHER_KEY)
    assert re.findall(r"<[A-Z_]+:[0-9a-f]{16}>", out3[0]) != tags[0]  # keyed: another key, other pseudonyms
    assert summary["entities"]["EMAIL_ADDRESS"] == 3 and summary["entities"]["CREDIT_CARD"] == 3
    assert summary["records"] == 6 and summary["strings_with_pii"] == 6


def test_fpe_round_trip_per_type(corpus):
    _, planted = corpus
    m = Masker(["default=fpe"], key=KEY)
    checked = {}
    for p in planted:
        if checked.get(p.entity_type, 0) >= 25:
            continue
        enc = m._encrypt(p.entity_type, p.value)
        if enc.startswith(f"<{p.entity_type}:"):  # too short for FF3-1: hashed, counted as a fallback
            continue
        assert enc != p.value and len(enc) == len(p.value)
        for a, b in zip(p.value, enc):
            if p.entity_type != "EMAIL_ADDRESS":
                assert a.isdigit() == b.isdigit() and a.isalpha() == b.isalpha(), (p.value, enc)
            if not a.isalnum():
                assert a == b
        assert unmask_value(enc, p.entity_type, KEY) == p.value
        assert unmask_value(enc, p.entity_type, OTHER_KEY) != p.value
        if p.entity_type == "CREDIT_CARD":  # check digits recomputed: still a well-formed number
            assert luhn_valid(enc)
        elif p.entity_type == "IBAN_CODE":
            assert iban_valid(enc) and enc[:2] == p.value[:2]
        elif p.entity_type == "FR_NIR":
            assert _fr_nir_valid(enc)
        assert m._encrypt(p.entity_type, p.value) == enc  # deterministic: consistent across records
        checked[p.entity_type] = checked.get(p.entity_type, 0) + 1
    assert set(checked) == set(ENTITIES) and min(checked.values()) == 25
    # values too short for FF3-1's domain are never left in clear, and are counted
    out, s = mask_texts(["from ip 1.2.3.4 today"], operators=["IP_ADDRESS=fpe"], key=KEY)
    assert "1.2.3.4" not in out[0] and re.search(r"<IP_ADDRESS:[0-9a-f]{16}>", out[0])
    assert s["fpe_fallback_to_hash"] == {"IP_ADDRESS": 1}


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_mask_file_jsonl_fpe_reverse_round_trip(tmp_path, corpus):
    records, planted = corpus
    src = _write_jsonl(tmp_path / "calib.jsonl", records[:60])
    key = generate_key(tmp_path / "k.key")
    assert (key.stat().st_mode & 0o777) == 0o600
    with pytest.raises(OutputExistsError):
        generate_key(key)
    ents = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN")
    s = mask_file(src, tmp_path / "out.jsonl", operators=["default=fpe"], key=key, entities=ents,
                  summary_path=tmp_path / "summary.json")
    masked = (tmp_path / "out.jsonl").read_text()
    values = [p.value for p in planted if p.record < 60 and p.entity_type in ents]
    assert values and not [v for v in values if v in masked]
    assert s["records"] == 60 and s["format"] == "jsonl" and s["fpe_fallback_to_hash"] == {}
    # at least the planted ones (other IDs also look like phone numbers to phonenumbers when their types are off)
    assert sum(s["entities"].values()) >= len(values)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["entities"] == s["entities"]
    assert not [v for v in values if v in (tmp_path / "summary.json").read_text()]  # no raw PII in the summary
    spans = json.loads((tmp_path / "out.jsonl.fpe-spans.json").read_text())
    assert len(spans["spans"]) == sum(s["entities"].values())
    assert not [v for v in values if v in json.dumps(spans)]
    # non-string fields untouched, record structure kept
    back_masked = [json.loads(line) for line in masked.splitlines()]
    assert [r["amount"] for r in back_masked] == [r["amount"] for r in records[:60]]
    res = unmask_file(tmp_path / "out.jsonl", tmp_path / "restored.jsonl", key)
    assert sum(res["decrypted"].values()) == sum(s["entities"].values())
    restored = [json.loads(line) for line in (tmp_path / "restored.jsonl").read_text().splitlines()]
    assert restored == records[:60]
    with pytest.raises(MaskingError, match="wrong key"):
        unmask_file(tmp_path / "out.jsonl", tmp_path / "restored2.jsonl", OTHER_KEY)
    assert not (tmp_path / "restored2.jsonl").exists()


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_mask_file_csv_and_text(tmp_path, corpus):
    records, planted = corpus
    src = tmp_path / "calib.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "notes"])
        for r in records[:40]:
            w.writerow([r["id"], r["text"], r["notes"]])
    s = mask_file(src, tmp_path / "out.csv", fields=["text"])
    rows = _read_csv(tmp_path / "out.csv")
    assert rows[0] == ["id", "text", "notes"] and len(rows) == 41
    assert [r[2] for r in rows[1:]] == [r["notes"] for r in records[:40]]  # unscanned column unchanged
    in_text = [p for p in planted if p.record < 40 and p.field == "text" and p.entity_type in STRUCTURED_ENTITIES]
    assert in_text and not [p for p in in_text if p.value in rows[1 + p.record][1]]
    assert "<" in rows[1][1] and s["format"] == "csv" and s["fields"] == ["text"]
    # text: one record per line, line endings kept
    txt = tmp_path / "calib.txt"
    txt.write_text("".join(r["text"] + "\r\n" for r in records[:40]), encoding="utf-8", newline="")
    s = mask_file(txt, tmp_path / "out.txt")
    out = (tmp_path / "out.txt").read_bytes().decode()
    assert out.count("\r\n") == 40 and s["records"] == 40 and s["format"] == "text"
    assert not [p for p in in_text if p.value in out]
    # CSV with fpe, then reversed: the file comes back byte for byte (IBANs and cards are long enough for FF3-1)
    s = mask_file(src, tmp_path / "fpe.csv", operators=["IBAN_CODE=fpe", "CREDIT_CARD=fpe"], key=KEY)
    assert s["entities"]["IBAN_CODE"] + s["entities"]["CREDIT_CARD"] > 0
    unmasked = tmp_path / "restored.csv"
    res = unmask_file(tmp_path / "fpe.csv", unmasked, KEY)
    assert sum(res["decrypted"].values()) == s["entities"]["IBAN_CODE"] + s["entities"]["CREDIT_CARD"]
    restored, tagged = _read_csv(unmasked), _read_csv(tmp_path / "fpe.csv")
    for orig, back, masked_row in zip([["id", "text", "notes"]] + [[str(r["id"]), r["text"], r["notes"]]
                                                                   for r in records[:40]], restored, tagged):
        for o, b, t in zip(orig, back, masked_row):
            if "<" not in t:  # cells with only fpe values decrypt exactly; tags stay tags
                assert b == o


@pytest.mark.parametrize("case", ["missing", "bad_json", "not_object", "bad_utf8", "ragged_csv", "csv_field",
                                  "jsonl_field", "unknown_op", "unknown_entity", "no_key_hash", "no_key_fpe",
                                  "short_key", "same_file", "bad_format"])
def test_bad_input_clear_errors(tmp_path, case):
    good = [{"text": "mail a.b@example.com"}, {"text": "card 4111 1111 1111 1111"}]
    src = _write_jsonl(tmp_path / "in.jsonl", good)
    out = tmp_path / "out.jsonl"
    kw: dict = {}
    expect = {"missing": "does not exist", "bad_json": "line 3: not valid JSON", "not_object": "line 2: expected a "
              "JSON object", "bad_utf8": "line 2: not UTF-8", "ragged_csv": "line 3: 3 fields", "csv_field": "not a "
              "column", "jsonl_field": "no record has this field", "unknown_op": "unknown operator 'scramble'",
              "unknown_entity": "unknown entity type 'PASSPORT'", "no_key_hash": "need a key", "no_key_fpe":
              "need a key", "short_key": "at least 32", "same_file": "is the input", "bad_format": "--format"}[case]
    if case == "missing":
        src = tmp_path / "nope.jsonl"
    elif case == "bad_json":
        src.write_text(src.read_text() + '{"text": "ok" \n')
    elif case == "not_object":
        src.write_text('{"text": "x"}\n["a list"]\n')
    elif case == "bad_utf8":
        src.write_bytes(b'{"text": "x"}\n{"text": "\xff\xfe"}\n')
    elif case in ("ragged_csv", "csv_field"):
        src = tmp_path / "in.csv"
        src.write_text("id,text\n1,hello\n2,a,b\n" if case == "ragged_csv" else "id,text\n1,hello\n")
        out = tmp_path / "out.csv"
        if case == "csv_field":
            kw["fields"] = ["body"]
    elif case == "jsonl_field":
        kw["fields"] = ["body"]
    elif case == "unknown_op":
        kw["operators"] = ["EMAIL_ADDRESS=scramble"]
    elif case == "unknown_entity":
        kw["operators"] = ["PASSPORT=tag"]
    elif case == "no_key_hash":
        kw["operators"] = ["EMAIL_ADDRESS=hash"]
    elif case == "no_key_fpe":
        kw["operators"] = ["default=fpe"]
    elif case == "short_key":
        (tmp_path / "k").write_bytes(b"tooshort\n")
        kw.update(operators=["default=hash"], key=tmp_path / "k")
    elif case == "same_file":
        out = src
    elif case == "bad_format":
        kw["fmt"] = "xml"
    with pytest.raises(MaskingError, match=re.escape(expect)):
        mask_file(src, out, **kw)
    if case != "same_file":
        assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


def test_existing_output_needs_overwrite(tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": "ip 10.20.30.40"}])
    out = tmp_path / "out.jsonl"
    out.write_text("keep me\n")
    with pytest.raises(OutputExistsError, match="--overwrite"):
        mask_file(src, out)
    assert out.read_text() == "keep me\n"
    mask_file(src, out, overwrite=True)
    assert json.loads(out.read_text()) == {"text": "ip <IP_ADDRESS>"}


def test_jsonl_records_without_pii_kept_byte_for_byte_and_spans_checked(tmp_path):
    src = tmp_path / "in.jsonl"
    raw = ['{"t":  "hello",   "x": 1.0e5}', "", '{"t": "card 4111 1111 1111 1111", "n": [1, {"u": "ip 10.20.30.40"}]}']
    src.write_text("\r\n".join(raw) + "\r\n", encoding="utf-8", newline="")
    s = mask_file(src, tmp_path / "out.jsonl", operators=["default=fpe"], key=KEY)
    lines = (tmp_path / "out.jsonl").read_bytes().decode().split("\r\n")
    assert lines[0] == raw[0] and lines[1] == ""  # untouched record and blank line copied as they were
    masked = json.loads(lines[2])
    assert "4111 1111 1111 1111" not in lines[2] and "10.20.30.40" not in lines[2]  # nested strings scanned too
    assert s["records"] == 2 and s["entities"]["CREDIT_CARD"] == 1 and s["entities"]["IP_ADDRESS"] == 1
    assert masked["n"][1]["u"].startswith("ip ") and len(masked["n"][1]["u"]) == len("ip 10.20.30.40")
    spans_file = tmp_path / "out.jsonl.fpe-spans.json"
    meta = json.loads(spans_file.read_text())
    assert sorted(tuple(x[1]) for x in meta["spans"]) == [("n", 1, "u"), ("t",)]
    unmask_file(tmp_path / "out.jsonl", tmp_path / "back.jsonl", KEY)
    back = (tmp_path / "back.jsonl").read_bytes().decode().split("\r\n")
    assert json.loads(back[2]) == json.loads(raw[2]) and back[0] == raw[0]
    meta["spans"][0][2] = 10_000  # a tampered spans file is refused, nothing written
    spans_file.write_text(json.dumps(meta))
    with pytest.raises(MaskingError, match="does not match"):
        unmask_file(tmp_path / "out.jsonl", tmp_path / "back2.jsonl", KEY)
    spans_file.write_text('{"version": 1, "format": "jsonl", "key_id": "x", "spans": [[0]]}')
    with pytest.raises(MaskingError, match="wrong key|not a secquant"):
        unmask_file(tmp_path / "out.jsonl", tmp_path / "back2.jsonl", KEY)
    assert not (tmp_path / "back2.jsonl").exists()


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_mask_summary_and_reverse(cli, tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", [
        {"id": 1, "text": "Card 4111 1111 1111 1111, mail jane.doe@example.com", "n": 3},
        {"id": 2, "text": "SSN 123-45-6788; born on 1984-03-05", "n": 4}])
    key, out, summ = tmp_path / "k.key", tmp_path / "out.jsonl", tmp_path / "s.json"
    r = cli("mask", src, "--out", out, "--operator", "CREDIT_CARD=fpe", "--operator", "US_SSN=fpe",
            "--operator", "EMAIL_ADDRESS=hash", "--key", key, "--generate-key", "--summary", summ)
    assert r.exit_code == 0, r.output
    assert "CREDIT_CARD" in r.stdout and "total" in r.stdout
    text = out.read_text()
    for v in ("4111 1111 1111 1111", "jane.doe@example.com", "123-45-6788", "1984-03-05"):
        assert v not in text
    assert "<DATE_OF_BIRTH>" in text and re.search(r"<EMAIL_ADDRESS:[0-9a-f]{16}>", text)
    s = json.loads(summ.read_text())
    assert s["entities"]["CREDIT_CARD"] == 1 and s["entities"]["DATE_OF_BIRTH"] == 1 and s["records"] == 2
    assert s["operators"]["CREDIT_CARD"] == "fpe" and s["operators"]["PERSON"] == "tag"
    r = cli("mask", out, "--reverse", "--key", key, "--out", tmp_path / "back.jsonl")
    assert r.exit_code == 0, r.output
    back = [json.loads(x) for x in (tmp_path / "back.jsonl").read_text().splitlines()]
    assert "4111 1111 1111 1111" in back[0]["text"] and "123-45-6788" in back[1]["text"]
    assert "<DATE_OF_BIRTH>" in back[1]["text"]  # tags are not reversible


@pytest.mark.parametrize("case", ["missing", "bad_json_line", "unknown_op", "no_key", "exists", "reverse_no_spans"])
def test_cli_errors_exit_2_no_traceback(cli, tmp_path, assert_user_error, case):
    src = _write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"text": "b"}])
    out = tmp_path / "out.jsonl"
    args = ["mask", src, "--out", out]
    existed = False
    contains: tuple[str, ...] = ()
    if case == "missing":
        args[1] = tmp_path / "nope.jsonl"
        contains = ("does not exist",)
    elif case == "bad_json_line":
        src.write_text('{"text": "a"}\n{"text": "b"}\n{oops\n')
        contains = ("line 3",)
    elif case == "unknown_op":
        args += ["--operator", "EMAIL_ADDRESS=rot13"]
        contains = ("unknown operator",)
    elif case == "no_key":
        args += ["--operator", "default=fpe"]
        contains = ("--key",)
    elif case == "exists":
        out.write_text("old\n")
        existed = True
        contains = ("--overwrite",)
    elif case == "reverse_no_spans":
        (tmp_path / "k").write_bytes(b"x" * 40)
        args += ["--reverse", "--key", tmp_path / "k"]
        contains = ("spans file",)
    r = cli(*args)
    assert_user_error(r, out, existed=existed, contains=contains)
    if existed:
        assert out.read_text() == "old\n"
