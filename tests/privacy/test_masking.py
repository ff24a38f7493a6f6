"""PII masking: operators (mask, tag, hash, surrogate), keys, file formats, bad input -> clear errors, CLI.

Detection (fail-closed, held-out corpus) is in test_masking_detection.py; the reverse table and legacy FF3-1
files in test_masking_reverse.py."""

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
    generate_key,
    mask_file,
    mask_texts,
    surrogate,
)
from secquant.privacy.masking.checks import date_plausible, iban_valid, ip_valid, luhn_valid, nir_valid
from secquant.privacy.masking.operators import MaskKey
from secquant.audits.pii_corpus import make_corpus

KEY = b"0123456789abcdef0123456789abcdef-test-key"
OTHER_KEY = b"another key of at least thirty-two bytes!!"
FIELDS = ("text", "notes")


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(400, seed=0)


@pytest.fixture(scope="module")
def analyzed(corpus):
    """The corpus analyzed once: {(record, field): [RecognizerResult]} (reused by every operator test)."""
    records, _ = corpus
    m = Masker()
    return {(i, f): m.analyze(r[f]) for i, r in enumerate(records) for f in FIELDS}


def test_detector_types():
    m = Masker()

    def found(text):
        return [(text[r.start:r.end], r.entity_type) for r in m.analyze(text)]

    assert found("Pay 4974 4436 0081 0424 now") == [("4974 4436 0081 0424", "CREDIT_CARD")]
    assert found("Call +4915123451747 now") == [("+4915123451747", "PHONE_NUMBER")]  # not a card after '+'
    assert found("IBAN DE89 3704 0044 0532 0130 00") == [("DE89 3704 0044 0532 0130 00", "IBAN_CODE")]
    assert found("NIR 1 84 12 76 451 089 46 ok") == [("1 84 12 76 451 089 46", "FR_NIR")]
    assert found("Shipped on 2024-03-02, born on 1984-03-05.") == [("1984-03-05", "DATE_OF_BIRTH")]
    assert found("Amex 3782 822463 10005") == [("3782 822463 10005", "CREDIT_CARD")]
    assert found("NI number AB 12 34 56 C") == [("AB 12 34 56 C", "UK_NINO")]
    assert found("Dr. Jane Smith and jane met") == [("Jane Smith", "PERSON")]
    assert found("from 10.20.30.40 and [2001:db8::8a2e:370:7334]") == [("10.20.30.40", "IP_ADDRESS"),
                                                                       ("2001:db8::8a2e:370:7334", "IP_ADDRESS")]


@pytest.mark.parametrize("op", ["mask", "tag", "hash", "surrogate"])
def test_no_planted_value_left_for_each_operator(corpus, analyzed, op):
    records, planted = corpus
    m = Masker([f"default={op}"], key=KEY)
    masked = {(i, f): m.mask(r[f], analyzed[(i, f)]) for i, r in enumerate(records) for f in FIELDS}
    leaks = [(p.entity_type, p.value) for p in planted if p.entity_type in STRUCTURED_ENTITIES
             and p.value in masked[(p.record, p.field)][0]]
    assert leaks == []
    s = m.summary()
    assert s["operators"] == {e: op for e in ENTITIES}
    assert s["entities"]["CREDIT_CARD"] >= 100 and s["total_found"] == sum(len(v) for v in analyzed.values())
    # replacements name their positions in the masked text and the value they replaced
    for (i, f), (text, reps) in masked.items():
        for r in reps:
            assert records[i][f].count(r.original) >= 1
            if op == "tag":
                assert text[r.start:r.end] == f"<{r.entity_type}>"
    # the operator's form on one grouped card
    sample = next(p for p in planted if p.entity_type == "CREDIT_CARD" and " " in p.value)
    text, reps = masked[(sample.record, sample.field)]
    rep = next(r for r in reps if r.original == sample.value)
    new = text[rep.start:rep.end]
    if op == "tag":
        assert new == "<CREDIT_CARD>"
    elif op == "mask":
        assert new == "*" * len(sample.value)
    elif op == "hash":
        assert re.fullmatch(r"<CREDIT_CARD:[0-9a-f]{16}>", new)
    else:  # surrogate: same shape (digits stay digits, spaces stay), other digits, Luhn-valid
        assert new != sample.value and len(new) == len(sample.value)
        assert [c.isdigit() for c in new] == [c.isdigit() for c in sample.value]
        assert luhn_valid(new)


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


def test_surrogates_keep_the_format_and_are_keyed(corpus):
    _, planted = corpus
    k, other = MaskKey.from_bytes(KEY), MaskKey.from_bytes(OTHER_KEY)
    well_formed = {"CREDIT_CARD": luhn_valid, "IBAN_CODE": iban_valid, "FR_NIR": nir_valid,
                   "DATE_OF_BIRTH": date_plausible, "IP_ADDRESS": ip_valid}
    checked: dict[str, int] = {}
    for p in planted:
        if checked.get(p.entity_type, 0) >= 20:
            continue
        s = surrogate(k, p.entity_type, p.value)
        assert s != p.value and s == surrogate(k, p.entity_type, p.value)  # deterministic: linkable across records
        assert surrogate(other, p.entity_type, p.value) != s
        if p.entity_type not in ("DATE_OF_BIRTH", "IP_ADDRESS"):
            assert len(s) == len(p.value)
            for a, b in zip(p.value, s):
                assert a.isdigit() == b.isdigit() and a.isalpha() == b.isalpha(), (p.value, s)
                if not a.isalnum():
                    assert a == b
        if p.entity_type in well_formed:
            assert well_formed[p.entity_type](s), (p.entity_type, p.value, s)
        if p.entity_type == "IBAN_CODE":
            assert s[:2] == p.value[:2]
        checked[p.entity_type] = checked.get(p.entity_type, 0) + 1
    assert set(checked) == set(ENTITIES) and min(checked.values()) == 20
    # one card written two ways gets one surrogate (separators kept)
    assert surrogate(k, "CREDIT_CARD", "4111 1111 1111 1111").replace(" ", "-") == \
        surrogate(k, "CREDIT_CARD", "4111-1111-1111-1111")
    # short values have no minimum domain (FF3-1 needed 10^6 and fell back to hashes)
    out, _ = mask_texts(["from ip 1.2.3.4 today"], operators=["IP_ADDRESS=surrogate"], key=KEY)
    assert "1.2.3.4" not in out[0] and re.fullmatch(r"from ip \d+\.\d+\.\d+\.\d+ today", out[0])


def test_withdrawn_ff3_operator_is_refused():
    for spec in (["CREDIT_CARD=fpe"], ["default=fpe"], {"IBAN_CODE": "ff3"}):
        with pytest.raises(MaskingError, match="withdrawn.*surrogate.*--legacy-ff3"):
            Masker(spec, key=KEY)


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def _read_csv(path: Path) -> list[list[str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def test_mask_file_jsonl_csv_and_text(tmp_path, corpus):
    records, planted = corpus
    src = _write_jsonl(tmp_path / "calib.jsonl", records[:40])
    key = generate_key(tmp_path / "k.key")
    assert (key.stat().st_mode & 0o777) == 0o600
    with pytest.raises(OutputExistsError):
        generate_key(key)
    s = mask_file(src, tmp_path / "out.jsonl", operators=["default=surrogate"], key=key,
                  summary_path=tmp_path / "summary.json")
    masked = (tmp_path / "out.jsonl").read_text()
    values = [p.value for p in planted if p.record < 40 and p.entity_type in STRUCTURED_ENTITIES]
    assert values and not [v for v in values if v in masked]
    assert s["records"] == 40 and s["format"] == "jsonl" and s["reverse_table"] is None
    assert sum(s["entities"].values()) >= len(values)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["entities"] == s["entities"]
    assert not [v for v in values if v in (tmp_path / "summary.json").read_text()]  # no raw PII in the summary
    back_masked = [json.loads(line) for line in masked.splitlines()]
    assert [r["amount"] for r in back_masked] == [r["amount"] for r in records[:40]]  # non-strings untouched
    # CSV: only the chosen column
    csv_src = tmp_path / "calib.csv"
    with open(csv_src, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text", "notes"])
        for r in records[:40]:
            w.writerow([r["id"], r["text"], r["notes"]])
    s = mask_file(csv_src, tmp_path / "out.csv", fields=["text"])
    rows = _read_csv(tmp_path / "out.csv")
    assert rows[0] == ["id", "text", "notes"] and len(rows) == 41
    assert [r[2] for r in rows[1:]] == [r["notes"] for r in records[:40]]  # unscanned column unchanged
    in_text = [p for p in planted if p.record < 40 and p.field == "text" and p.entity_type in STRUCTURED_ENTITIES]
    assert in_text and not [p for p in in_text if p.value in rows[1 + p.record][1]]
    assert s["format"] == "csv" and s["fields"] == ["text"]
    # text: one record per line, line endings kept
    txt = tmp_path / "calib.txt"
    txt.write_text("".join(r["text"] + "\r\n" for r in records[:40]), encoding="utf-8", newline="")
    s = mask_file(txt, tmp_path / "out.txt")
    out = (tmp_path / "out.txt").read_bytes().decode()
    assert out.count("\r\n") == 40 and s["records"] == 40 and s["format"] == "text"
    assert not [p for p in in_text if p.value in out]


@pytest.mark.parametrize("case", ["missing", "bad_json", "not_object", "bad_utf8", "ragged_csv", "csv_field",
                                  "jsonl_field", "unknown_op", "unknown_entity", "no_key_hash", "no_key_surrogate",
                                  "fpe", "short_key", "same_file", "bad_format", "bad_recipient", "table_no_to"])
def test_bad_input_clear_errors(tmp_path, case):
    good = [{"text": "mail a.b@example.com"}, {"text": "card 4111 1111 1111 1111"}]
    src = _write_jsonl(tmp_path / "in.jsonl", good)
    out = tmp_path / "out.jsonl"
    kw: dict = {}
    expect = {"missing": "does not exist", "bad_json": "line 3: not valid JSON", "not_object": "line 2: expected a "
              "JSON object", "bad_utf8": "line 2: not UTF-8", "ragged_csv": "line 3: 3 fields", "csv_field": "not a "
              "column", "jsonl_field": "no record has this field", "unknown_op": "unknown operator 'scramble'",
              "unknown_entity": "unknown entity type 'PASSPORT'", "no_key_hash": "need a key", "no_key_surrogate":
              "need a key", "fpe": "withdrawn", "short_key": "at least 32", "same_file": "is the input",
              "bad_format": "--format", "bad_recipient": "not an age X25519 recipient", "table_no_to": "--to"}[case]
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
    elif case == "no_key_surrogate":
        kw["operators"] = ["default=surrogate"]
    elif case == "fpe":
        kw.update(operators=["CREDIT_CARD=fpe"], key=KEY)
    elif case == "short_key":
        (tmp_path / "k").write_bytes(b"tooshort\n")
        kw.update(operators=["default=hash"], key=tmp_path / "k")
    elif case == "same_file":
        out = src
    elif case == "bad_format":
        kw["fmt"] = "xml"
    elif case == "bad_recipient":
        kw["recipients"] = ["age1notakey"]
    elif case == "table_no_to":
        kw["table_path"] = tmp_path / "t.age"
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


def test_jsonl_records_without_pii_kept_byte_for_byte(tmp_path):
    src = tmp_path / "in.jsonl"
    raw = ['{"t":  "hello",   "x": 1.0e5}', "", '{"t": "card 4111 1111 1111 1111", "n": [1, {"u": "ip 10.20.30.40"}]}']
    src.write_text("\r\n".join(raw) + "\r\n", encoding="utf-8", newline="")
    s = mask_file(src, tmp_path / "out.jsonl")
    lines = (tmp_path / "out.jsonl").read_bytes().decode().split("\r\n")
    assert lines[0] == raw[0] and lines[1] == ""  # untouched record and blank line copied as they were
    assert json.loads(lines[2]) == {"t": "card <CREDIT_CARD>", "n": [1, {"u": "ip <IP_ADDRESS>"}]}  # nested too
    assert s["records"] == 2 and s["entities"]["CREDIT_CARD"] == 1 and s["entities"]["IP_ADDRESS"] == 1


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_mask_summary(cli, tmp_path):
    src = _write_jsonl(tmp_path / "in.jsonl", [
        {"id": 1, "text": "Card 4111 1111 1111 1111, mail jane.doe@mail.test", "n": 3},
        {"id": 2, "text": "SSN 123-45-6788; born on 1984-03-05; call +1 555-0123", "n": 4}])
    key, out, summ = tmp_path / "k.key", tmp_path / "out.jsonl", tmp_path / "s.json"
    r = cli("mask", src, "--out", out, "--operator", "CREDIT_CARD=surrogate", "--operator", "US_SSN=surrogate",
            "--operator", "EMAIL_ADDRESS=hash", "--key", key, "--generate-key", "--summary", summ)
    assert r.exit_code == 0, r.output
    assert "CREDIT_CARD" in r.stdout and "total" in r.stdout and "not reversible" in r.stderr
    text = out.read_text()
    for v in ("4111 1111 1111 1111", "jane.doe", "mail.test", "123-45-6788", "1984-03-05", "555-0123", "+1"):
        assert v not in text
    assert "<DATE_OF_BIRTH>" in text and "<PHONE_NUMBER>" in text and re.search(r"<EMAIL_ADDRESS:[0-9a-f]{16}>", text)
    s = json.loads(summ.read_text())
    assert s["entities"]["CREDIT_CARD"] == 1 and s["entities"]["DATE_OF_BIRTH"] == 1 and s["records"] == 2
    assert s["operators"]["CREDIT_CARD"] == "surrogate" and s["operators"]["PERSON"] == "tag"
    assert s["masked_without_passing_check"] == {"EMAIL_ADDRESS": 1, "PHONE_NUMBER": 1}  # masked all the same


@pytest.mark.parametrize("case", ["missing", "bad_json_line", "unknown_op", "fpe", "no_key", "exists", "reverse"])
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
    elif case == "fpe":
        (tmp_path / "k").write_bytes(b"x" * 40)
        args += ["--operator", "CREDIT_CARD=fpe", "--key", tmp_path / "k"]
        contains = ("withdrawn", "--legacy-ff3")
    elif case == "no_key":
        args += ["--operator", "default=surrogate"]
        contains = ("--key",)
    elif case == "exists":
        out.write_text("old\n")
        existed = True
        contains = ("--overwrite",)
    elif case == "reverse":
        args += ["--reverse"]
        contains = ("secquant unmask",)
    r = cli(*args)
    assert_user_error(r, out, existed=existed, contains=contains)
    if existed:
        assert out.read_text() == "old\n"
