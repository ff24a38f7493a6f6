"""Reversible masking: the age-encrypted reverse table (round trips, wrong identity, edited files) and files masked
with the withdrawn FF3-1 operator (`--legacy-ff3`, on fixtures written by the old code path)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
from pyrage import x25519

from secquant.privacy.masking import MaskingError, mask_file, unmask_file, unmask_legacy_ff3, unmask_value

KEY = b"0123456789abcdef0123456789abcdef-test-key"
LEGACY = Path(__file__).parent / "data" / "legacy_ff3"
RECORDS = [
    {"id": 1, "text": "Card 4111 1111 1111 1111, mail jane.doe@corp.example", "notes": "call +1 555-0123 ext. 7"},
    {"id": 2, "text": "nothing to see", "notes": "IBAN NL91 1234 5678 9012 34 or NL71 1234 5678 9012 34"},
    {"id": 3, "text": "Dr. Jane Smith, born on 1984-03-05, SSN 123-45-6788", "notes": "ip 10.20.30.40",
     "nested": [{"x": "mail ops@svc.internal"}], "n": 4.5},
]


@pytest.fixture
def age_id(tmp_path):
    """(identity file, recipient string) of a fresh age X25519 key."""
    ident = x25519.Identity.generate()
    path = tmp_path / "me.key"
    path.write_text(f"{ident}\n")
    path.chmod(0o600)  # as keygen writes it (a readable key draws a warning)
    return path, str(ident.to_public())


def _write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


@pytest.mark.parametrize("op", ["tag", "surrogate", "hash", "mask"])
def test_reverse_table_round_trip_jsonl(tmp_path, age_id, op):
    ident, recipient = age_id
    src = _write_jsonl(tmp_path / "in.jsonl", RECORDS)
    s = mask_file(src, tmp_path / "out.jsonl", operators=[f"default={op}"], key=KEY, recipients=[recipient])
    table = tmp_path / "out.jsonl.reverse.age"
    assert s["reverse_table"] == str(table) and table.read_bytes().startswith(b"age-encryption.org/v1")
    masked = (tmp_path / "out.jsonl").read_text()
    for v in ("4111 1111 1111 1111", "jane.doe", "555-0123", "NL91 1234", "123-45-6788", "10.20.30.40",
              "ops@svc.internal"):
        assert v not in masked and v.encode() not in table.read_bytes()
    res = unmask_file(tmp_path / "out.jsonl", tmp_path / "back.jsonl", ident)
    assert [json.loads(x) for x in (tmp_path / "back.jsonl").read_text().splitlines()] == RECORDS
    assert sum(res["restored"].values()) == s["total_found"] and res["records"] == 3


def test_reverse_table_round_trip_csv_and_text(tmp_path, age_id):
    ident, recipient = age_id
    rows = [["id", "text", "notes"]] + [[str(r["id"]), r["text"], r["notes"]] for r in RECORDS]
    src = tmp_path / "in.csv"
    with open(src, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    mask_file(src, tmp_path / "out.csv", operators=["default=surrogate"], key=KEY, recipients=[recipient])
    unmask_file(tmp_path / "out.csv", tmp_path / "back.csv", ident)
    with open(tmp_path / "back.csv", newline="", encoding="utf-8") as f:
        assert list(csv.reader(f)) == rows
    txt = tmp_path / "in.txt"
    txt.write_text("".join(r["text"] + " | " + r["notes"] + "\r\n" for r in RECORDS), encoding="utf-8", newline="")
    mask_file(txt, tmp_path / "out.txt", recipients=[recipient], table_path=tmp_path / "t.age")
    unmask_file(tmp_path / "out.txt", tmp_path / "back.txt", ident, table_path=tmp_path / "t.age")
    assert (tmp_path / "back.txt").read_bytes() == txt.read_bytes()


def test_unmask_refuses_wrong_identity_and_edited_file(tmp_path, age_id):
    ident, recipient = age_id
    src = _write_jsonl(tmp_path / "in.jsonl", RECORDS)
    mask_file(src, tmp_path / "out.jsonl", recipients=[recipient])
    other = tmp_path / "other.key"
    other.write_text(f"{x25519.Identity.generate()}\n")
    other.chmod(0o600)
    with pytest.raises(MaskingError, match="wrong key"):
        unmask_file(tmp_path / "out.jsonl", tmp_path / "back.jsonl", other)
    assert not (tmp_path / "back.jsonl").exists()
    # the masked file edited after masking (one tag moved): positions would restore into the wrong places
    edited = tmp_path / "edited.jsonl"
    edited.write_text((tmp_path / "out.jsonl").read_text().replace("Card <CREDIT_CARD>", "Card  <CREDIT_CARD>"))
    shutil.copy(tmp_path / "out.jsonl.reverse.age", tmp_path / "edited.jsonl.reverse.age")
    with pytest.raises(MaskingError, match="SHA-256 differs"):
        unmask_file(edited, tmp_path / "back.jsonl", ident)
    assert not (tmp_path / "back.jsonl").exists()
    # a table that is not one, and a missing one
    (tmp_path / "junk.age").write_bytes(b"not age at all")
    with pytest.raises(MaskingError, match="wrong key"):
        unmask_file(tmp_path / "out.jsonl", tmp_path / "back.jsonl", ident, table_path=tmp_path / "junk.age")
    with pytest.raises(MaskingError, match="does not exist"):
        unmask_file(tmp_path / "out.jsonl", tmp_path / "back.jsonl", ident, table_path=tmp_path / "nope.age")
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []


# ------------------------------------------------------------------------------------------ legacy FF3-1


@pytest.mark.parametrize("name", ["masked.jsonl", "masked.txt"])
def test_legacy_ff3_files_still_decrypt(tmp_path, name):
    """Fixtures written by the old `fpe` operator (commit b5f9c5b): the old code path's output, not the new one's."""
    plain = LEGACY / name.replace("masked", "plain")
    res = unmask_legacy_ff3(LEGACY / name, tmp_path / "back", LEGACY / "mask.key")
    if name.endswith(".jsonl"):
        back = [json.loads(x) for x in (tmp_path / "back").read_text().splitlines()]
        assert back == [json.loads(x) for x in plain.read_text().splitlines()]
        assert res["restored"] == {"CREDIT_CARD": 2, "EMAIL_ADDRESS": 1, "IBAN_CODE": 1, "US_SSN": 1,
                                   "PHONE_NUMBER": 1, "FR_NIR": 1, "IP_ADDRESS": 1}
    else:
        assert (tmp_path / "back").read_text() == plain.read_text()
    assert unmask_value("4801 8404 0049 7451", "CREDIT_CARD", LEGACY / "mask.key") == "4111 1111 1111 1111"


def test_legacy_ff3_refuses_wrong_key_and_edited_spans(tmp_path):
    (tmp_path / "wrong.key").write_bytes(KEY)
    with pytest.raises(MaskingError, match="wrong key"):
        unmask_legacy_ff3(LEGACY / "masked.jsonl", tmp_path / "back.jsonl", tmp_path / "wrong.key")
    for f in ("masked.jsonl", "masked.jsonl.fpe-spans.json"):
        shutil.copy(LEGACY / f, tmp_path / f)
    spans = tmp_path / "masked.jsonl.fpe-spans.json"
    meta = json.loads(spans.read_text())
    meta["spans"][0][2] = 10_000
    spans.write_text(json.dumps(meta))
    with pytest.raises(MaskingError, match="does not match"):
        unmask_legacy_ff3(tmp_path / "masked.jsonl", tmp_path / "back.jsonl", LEGACY / "mask.key")
    assert not (tmp_path / "back.jsonl").exists()


# ------------------------------------------------------------------------------------------------------- CLI


def test_cli_mask_to_and_unmask(cli, tmp_path, age_id):
    ident, recipient = age_id
    pub = tmp_path / "me.pub"
    pub.write_text(recipient + "\n")
    src = _write_jsonl(tmp_path / "in.jsonl", RECORDS)
    out = tmp_path / "out.jsonl"
    r = cli("mask", src, "--out", out, "--operator", "default=surrogate", "--key", tmp_path / "k.key",
            "--generate-key", "--to", pub)
    assert r.exit_code == 0, r.output
    assert "reverse table" in r.stderr and "4111 1111 1111 1111" not in out.read_text()
    r = cli("unmask", out, "--out", tmp_path / "back.jsonl", "--identity", ident)
    assert r.exit_code == 0, r.output
    assert [json.loads(x) for x in (tmp_path / "back.jsonl").read_text().splitlines()] == RECORDS
    r = cli("unmask", LEGACY / "masked.jsonl", "--out", tmp_path / "legacy.jsonl", "--legacy-ff3", "--key",
            LEGACY / "mask.key")
    assert r.exit_code == 0, r.output
    assert "4111 1111 1111 1111" in (tmp_path / "legacy.jsonl").read_text()


@pytest.mark.parametrize("case", ["no_identity", "wrong_identity", "legacy_no_key", "legacy_wrong_key",
                                  "legacy_no_spans"])
def test_cli_unmask_errors_exit_2(cli, tmp_path, assert_user_error, age_id, case):
    ident, recipient = age_id
    src = _write_jsonl(tmp_path / "in.jsonl", RECORDS)
    mask_file(src, tmp_path / "m.jsonl", recipients=[recipient])
    out = tmp_path / "back.jsonl"
    args: list = ["unmask", tmp_path / "m.jsonl", "--out", out]
    contains: tuple[str, ...] = ()
    if case == "no_identity":
        contains = ("--identity",)
    elif case == "wrong_identity":
        (tmp_path / "o.key").write_text(f"{x25519.Identity.generate()}\n")
        (tmp_path / "o.key").chmod(0o600)
        args += ["--identity", tmp_path / "o.key"]
        contains = ("wrong key",)
    elif case == "legacy_no_key":
        args += ["--legacy-ff3"]
        contains = ("--key",)
    elif case == "legacy_wrong_key":
        (tmp_path / "k").write_bytes(KEY)
        args = ["unmask", LEGACY / "masked.jsonl", "--out", out, "--legacy-ff3", "--key", tmp_path / "k"]
        contains = ("wrong key",)
    elif case == "legacy_no_spans":
        args += ["--legacy-ff3", "--key", LEGACY / "mask.key"]
        contains = ("spans file",)
    assert_user_error(cli(*args), out, contains=contains)
