"""Masking and restoring JSONL, CSV and text files, written atomically (all outputs appear together or not at all)."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from ...artifact.fsutil import UMASK
from ...errors import OutputExistsError
from .common import ENTITIES, FORMATS, MaskingError
from .operators import Masker, MaskKey, Replacement, read_key_material
from .reverse import TABLE_SUFFIX, decrypt_table, encrypt_table, sha256_file


class _AtomicFiles:
    """Temp files next to their targets; all renamed into place on commit, all removed on error.

    Several files (masked output, summary, reverse table) must appear together, which fsutil's one-directory
    helper does not cover."""

    def __init__(self) -> None:
        self.pending: list[tuple[Path, Path]] = []

    def _temp(self, target: Path) -> tuple[int, Path]:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.tmp-", dir=target.parent)
        self.pending.append((Path(tmp), target))
        os.chmod(tmp, 0o666 & ~UMASK)  # mkstemp makes 0600; outputs get the usual permissions (keys stay 0600)
        return fd, Path(tmp)

    def open(self, target: Path, newline: str | None = None):
        fd, _ = self._temp(target)
        return os.fdopen(fd, "w", encoding="utf-8", newline=newline)

    def write_bytes(self, target: Path, data: bytes) -> None:
        fd, _ = self._temp(target)
        with os.fdopen(fd, "wb") as f:
            f.write(data)

    def temp_of(self, target: Path) -> Path:
        return next(tmp for tmp, t in self.pending if t == target)

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
            raise MaskingError(f"output {p} is the input file; write to a new file")
        if p.exists() and not overwrite:
            raise OutputExistsError(f"{p} exists; pass --overwrite to replace it")
        if p.is_dir():
            raise MaskingError(f"output {p} is a directory; give a file name")


def mask_file(src: str | os.PathLike, out: str | os.PathLike, *, fmt: str | None = None,
              fields: Sequence[str] | None = None, operators: Mapping[str, str] | Iterable[str] | None = None,
              key: MaskKey | str | os.PathLike | bytes | None = None, entities: Iterable[str] | None = None,
              recipients: Sequence[str] | None = None, table_path: str | os.PathLike | None = None,
              summary_path: str | os.PathLike | None = None, overwrite: bool = False,
              progress: Callable[[str, int | None], Callable[[int], None]] | None = None) -> dict:
    """Mask a JSONL, CSV or text file into `out` (written atomically) and return the summary dict.

    JSONL: every string in each object (or only under the top-level `fields`); CSV: every column (or `fields`);
    text: every line. With `recipients` (age1... keys or .pub files) the replaced values are also written, by
    position, to an age-encrypted reverse table (`table_path`, default OUT + '.reverse.age') that `unmask_file`
    reads with a matching identity.
    """
    src, out = Path(src), Path(out)
    fmt = detect_format(src, fmt)
    fields = list(fields) if fields else None
    if fields and fmt == "text":
        raise MaskingError("--field applies to JSONL and CSV; a text file is masked line by line")
    masker = Masker(operators, key, entities)
    table_p = (Path(table_path) if table_path else out.with_name(out.name + TABLE_SUFFIX)) if recipients else None
    if table_path and not recipients:
        raise MaskingError("--table needs --to RECIPIENT (whom to encrypt the reverse table to)")
    summary_p = Path(summary_path) if summary_path else None
    _check_outputs([out, table_p, summary_p], src, overwrite)
    if recipients:
        from ...errors import SecquantError
        from ...security.keys import load_recipients

        try:
            load_recipients(list(recipients))  # refuse a bad recipient before reading anything
        except SecquantError as e:
            raise MaskingError(f"--to: {e}") from None

    files = _AtomicFiles()
    entries: list[list] = []  # [record, location, start, end, TYPE, original]: only kept with recipients
    seen_fields: set[str] = set()
    records = 0

    def keep(rec: int, loc, reps: list[Replacement]) -> None:
        if table_p is not None:
            entries.extend([rec, loc, r.start, r.end, r.entity_type, r.original] for r in reps)

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
                        masked, reps = masker.mask(s)
                        keep(rec, list(p), reps)
                        if reps:
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
                records = _mask_csv(fin, fout, src, fields, masker, keep, advance)
            else:
                for _, line in _lines(fin, src):
                    body = line.rstrip("\r\n")
                    masked, reps = masker.mask(body)
                    keep(records, None, reps)
                    fout.write(masked + line[len(body):])
                    records += 1
                    advance(1)
            fout.close()
            summary = masker.summary()
            summary.update({"format": fmt, "records": records, "input": str(src), "output": str(out),
                            "fields": ("every line" if fmt == "text" else fields or "every string field"),
                            "reverse_table": str(table_p) if table_p else None})
            if table_p is not None:
                digest = sha256_file(files.temp_of(out))
                files.write_bytes(table_p, encrypt_table(entries, fmt, out.name, digest, list(recipients or ())))
            if summary_p is not None:
                with files.open(summary_p) as f:
                    json.dump(summary, f, indent=2)
                    f.write("\n")
            files.commit()
        except BaseException:
            files.abort()
            raise
    return summary


def _mask_csv(fin, fout, src: Path, fields, masker: Masker, keep, advance) -> int:
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
            row[i], reps = masker.mask(row[i])
            keep(rec, i, reps)
        writer.writerow(row)
        rec += 1
        advance(1)
    return rec


# ----------------------------------------------------------------------------------------------------------------
# restoring


def _restore_file(src: Path, out: Path, fmt: str, restore: Callable[[str, int, Any], str], with_values: set[int],
                  overwrite: bool, csv_loc: Callable[[int, str], Any], check: Callable[[], None]) -> int:
    """Rewrite `src` into `out` (atomically) with `restore(text, record, location)` applied to every string of the
    records in `with_values`; `check()` runs before anything is renamed into place. Returns the record count."""
    _check_outputs([out], src, overwrite)
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
                    if records in with_values:
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
                        writer.writerow([restore(v, records, csv_loc(i, h))
                                         for i, (h, v) in enumerate(zip(header, row))])
                        records += 1
                except (StopIteration, csv.Error) as e:
                    raise MaskingError(f"{src}: malformed CSV ({e})") from None
            else:
                for _, line in _lines(fin, src):
                    body = line.rstrip("\r\n")
                    fout.write(restore(body, records, None) + line[len(body):])
                    records += 1
            fout.close()
            check()
            files.commit()
        except BaseException:
            files.abort()
            raise
    return records


def unmask_file(src: str | os.PathLike, out: str | os.PathLike, identity: str | os.PathLike, *,
                table_path: str | os.PathLike | None = None, passphrase: str | None = None,
                overwrite: bool = False) -> dict:
    """Restore the values of a file written by `mask_file(..., recipients=...)` from its age-encrypted reverse table
    (decrypted in memory with `identity`); atomic. Refuses a wrong identity and a masked file that changed since.

    Returns {"records": N, "restored": {TYPE: count}}.
    """
    src, out = Path(src), Path(out)
    table_p = Path(table_path) if table_path else src.with_name(src.name + TABLE_SUFFIX)
    doc = decrypt_table(table_p, identity, passphrase)
    if not src.is_file():
        raise MaskingError(f"input file {src} does not exist")
    if sha256_file(src) != doc["masked_sha256"]:
        raise MaskingError(f"{src} is not the file {table_p} was written for (its SHA-256 differs: was it edited or "
                           "re-masked?); nothing restored")
    by_loc: dict[tuple, list] = {}
    for rec, loc, a, b, t, orig in doc["entries"]:
        by_loc.setdefault((rec, json.dumps(loc)), []).append((a, b, t, orig))
    counts: Counter[str] = Counter()

    def restore(text: str, rec: int, loc) -> str:
        for a, b, t, orig in sorted(by_loc.get((rec, json.dumps(loc)), ()), reverse=True):
            if b > len(text):
                raise MaskingError(f"{table_p} does not match {src} (record {rec}); nothing restored")
            text = text[:a] + orig + text[b:]
            counts[t] += 1
        return text

    def check() -> None:
        if sum(counts.values()) != len(doc["entries"]):
            raise MaskingError(f"{table_p} names {len(doc['entries'])} values but {sum(counts.values())} were found "
                               f"in {src}; nothing restored")

    records = _restore_file(src, out, doc["format"], restore, {rec for rec, _ in by_loc}, overwrite,
                            lambda i, h: i, check)
    return {"records": records, "restored": dict(counts)}


def unmask_legacy_ff3(src: str | os.PathLike, out: str | os.PathLike, key: str | os.PathLike | bytes, *,
                      spans_path: str | os.PathLike | None = None, overwrite: bool = False) -> dict:
    """Decrypt the values of a file masked with the withdrawn FF3-1 `fpe` operator (positions from its
    `.fpe-spans.json` file); atomic. Returns {"records": N, "restored": {TYPE: count}}."""
    from .legacy_ff3 import SPANS_SUFFIX, SPANS_VERSION, LegacyFf3

    src, out = Path(src), Path(out)
    fpe = LegacyFf3(key if isinstance(key, bytes) else read_key_material(key))
    spans_p = Path(spans_path) if spans_path else src.with_name(src.name + SPANS_SUFFIX)
    if not spans_p.exists():
        raise MaskingError(f"spans file {spans_p} does not exist; --legacy-ff3 needs the positions written when the "
                           "file was masked with fpe (pass --spans FILE)")
    try:
        meta = json.loads(spans_p.read_text(encoding="utf-8"))
        fmt, spans = meta["format"], meta["spans"]
        if meta.get("version") != SPANS_VERSION or fmt not in FORMATS or not isinstance(spans, list):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise MaskingError(f"{spans_p} is not a secquant fpe spans file") from None
    if meta.get("key_id") != fpe.key_id:
        raise MaskingError(f"wrong key: {src} was masked with a different key (key id {meta.get('key_id')}, this "
                           f"key {fpe.key_id}); give the key file used for masking")
    by_loc: dict[tuple, list] = {}
    for s in spans:
        try:
            rec, loc, a, b, t = s
            if not (isinstance(rec, int) and isinstance(a, int) and isinstance(b, int) and t in ENTITIES):
                raise ValueError
        except (ValueError, TypeError):
            raise MaskingError(f"{spans_p} is not a secquant fpe spans file (bad entry {s!r:.80})") from None
        by_loc.setdefault((rec, json.dumps(loc)), []).append((a, b, t))
    counts: Counter[str] = Counter()

    def restore(text: str, rec: int, loc) -> str:
        for a, b, t in by_loc.get((rec, json.dumps(loc)), ()):
            plain = fpe.decrypt(text[a:b], t) if 0 <= a < b <= len(text) else None
            if plain is None:
                raise MaskingError(f"{spans_p} does not match {src} (record {rec}); was the file edited?")
            text = text[:a] + plain + text[b:]
            counts[t] += 1
        return text

    def check() -> None:
        if sum(counts.values()) != len(spans):
            raise MaskingError(f"{spans_p} names {len(spans)} values but {sum(counts.values())} were found in "
                               f"{src}; is it the file that was masked?")

    records = _restore_file(src, out, fmt, restore, {rec for rec, _ in by_loc}, overwrite, lambda i, h: h, check)
    return {"records": records, "restored": dict(counts)}
