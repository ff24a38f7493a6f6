"""CLI commands: mask (PII masking of calibration text) and unmask (restore from the age-encrypted reverse table, or
decrypt files masked with the withdrawn FF3-1 operator with --legacy-ff3)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .common import RichProgress, err, out, read_passphrase, user_errors

app = typer.Typer()


@app.command()
@user_errors
def mask(
    src: Path = typer.Argument(..., metavar="IN", help="JSONL, CSV or text file (one record per line)"),
    out_path: Path = typer.Option(..., "--out", "-o", help="masked file to write (atomically)"),
    fmt: Optional[str] = typer.Option(None, "--format", help="jsonl, csv or text (default: from IN's suffix)"),
    field: Optional[list[str]] = typer.Option(None, "--field", help="JSONL key / CSV column to scan; repeat for "
                                                                   "several (default: every string field)"),
    operator: Optional[list[str]] = typer.Option(None, "--operator", help="TYPE=OP with OP one of mask, tag, "
                                                 "hash, surrogate; TYPE an entity type or 'default' (default: "
                                                 "tag)"),
    key: Optional[Path] = typer.Option(None, "--key", help="key file for hash and surrogate (>= 32 random "
                                                           "bytes)"),
    generate_key: bool = typer.Option(False, "--generate-key", help="create --key FILE (new random key, mode "
                                                                    "0600) first; refuses to replace one"),
    to: Optional[list[str]] = typer.Option(None, "--to", help="age recipient (age1... or a .pub file); repeat "
                                           "for several: also write the replaced values, encrypted to them, "
                                           "to a reverse table for `secquant unmask`"),
    table: Optional[Path] = typer.Option(None, "--table", help="reverse table to write (default: "
                                                               "OUT.reverse.age; needs --to)"),
    summary: Optional[Path] = typer.Option(None, "--summary", help="write the summary JSON here"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out (and --summary/--table) if they "
                                                              "exist"),
    reverse: bool = typer.Option(False, "--reverse", hidden=True),
) -> None:
    """Detect PII (emails, phones, cards, IBANs, IPs, national IDs, dates of birth, names in context) in IN
    and write OUT with every match masked, tagged, hashed or replaced by a format-preserving surrogate."""
    from rich.table import Table

    from ..errors import SecquantError
    from ..privacy.masking import generate_key as _generate_key
    from ..privacy.masking import mask_file

    if reverse:
        raise SecquantError("`secquant mask --reverse` is now `secquant unmask IN --out OUT --identity KEY` (or "
                            "`--legacy-ff3 --key FILE` for files masked with fpe)")
    if generate_key:
        if key is None:
            raise SecquantError("--generate-key needs --key FILE (where to write the new key)")
        _generate_key(key)
        err.print(f"wrote a new key to {key} (mode 0600); keep it secret: it links pseudonyms and surrogates to "
                  "values", highlight=False, soft_wrap=True)
    with RichProgress() as prog:
        s = mask_file(src, out_path, fmt=fmt, fields=field, operators=operator, key=key, recipients=to,
                      table_path=table, summary_path=summary, overwrite=overwrite, progress=prog)
    t = Table(title=f"PII masked in {s['records']} record(s) of {src.name} -> {out_path}")
    t.add_column("entity type")
    t.add_column("found", justify="right")
    t.add_column("no check passed", justify="right")
    t.add_column("operator")
    for e, n in s["entities"].items():
        t.add_row(e, str(n), str(s["masked_without_passing_check"].get(e, 0)), s["operators"][e])
    t.add_row("total", str(s["total_found"]), "", "")
    out.print(t)
    notes = ["every match is masked, also when no check (checksum, assigned range, public suffix) passed"]
    if s.get("reverse_table"):
        notes.append(f"reverse table (age-encrypted): {s['reverse_table']}")
    else:
        notes.append("not reversible: pass --to RECIPIENT to keep an encrypted reverse table")
    if summary:
        notes.append(f"summary: {summary}")
    notes.append(s["detector"]["person"])
    for n in notes:
        err.print(n, highlight=False, soft_wrap=True)

@app.command()
@user_errors
def unmask(
    src: Path = typer.Argument(..., metavar="IN", help="a file written by `secquant mask`"),
    out_path: Path = typer.Option(..., "--out", "-o", help="restored file to write (atomically)"),
    identity: Optional[Path] = typer.Option(None, "--identity", help="age identity the reverse table is "
                                                                     "encrypted to"),
    ask_passphrase: bool = typer.Option(False, "--passphrase", help="the identity is passphrase-protected"),
    table: Optional[Path] = typer.Option(None, "--table", help="reverse table (default: IN.reverse.age)"),
    legacy_ff3: bool = typer.Option(False, "--legacy-ff3", help="IN was masked with the withdrawn FF3-1 fpe "
                                                                "operator: decrypt it with --key"),
    key: Optional[Path] = typer.Option(None, "--key", help="with --legacy-ff3: the key file IN was masked with"),
    spans: Optional[Path] = typer.Option(None, "--spans", help="with --legacy-ff3: positions file (default: "
                                                               "IN.fpe-spans.json)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace --out if it exists"),
) -> None:
    """Restore the values `secquant mask --to` replaced (from the age-encrypted reverse table), or with
    --legacy-ff3 decrypt a file masked with the old fpe operator."""
    from ..errors import SecquantError
    from ..privacy.masking import unmask_file, unmask_legacy_ff3

    if legacy_ff3:
        if key is None:
            raise SecquantError("--legacy-ff3 needs --key FILE (the key the data was masked with)")
        if identity or table:
            raise SecquantError("--legacy-ff3 takes --key and --spans; --identity and --table are for files "
                                "masked with --to")
        res = unmask_legacy_ff3(src, out_path, key, spans_path=spans, overwrite=overwrite)
    else:
        if identity is None:
            raise SecquantError("unmask needs --identity KEY (an age identity the reverse table was encrypted "
                                "to); for files masked with fpe use --legacy-ff3 --key FILE")
        if key or spans:
            raise SecquantError("--key and --spans apply to --legacy-ff3 only")
        res = unmask_file(src, out_path, identity, table_path=table, passphrase=read_passphrase(ask_passphrase),
                          overwrite=overwrite)
    n = sum(res["restored"].values())
    err.print(f"restored {n} value(s) in {res['records']} record(s) -> {out_path}", highlight=False,
              soft_wrap=True)
