"""CLI commands: mask (PII masking of calibration text, and --reverse for format-preserving encrypted values)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer, audit: typer.Typer) -> None:
    """Add `secquant mask` to the main app."""
    from . import RichProgress, err, out, user_errors

    @app.command()
    @user_errors
    def mask(
        src: Path = typer.Argument(..., metavar="IN", help="JSONL, CSV or text file (one record per line)"),
        out_path: Path = typer.Option(..., "--out", "-o", help="masked file to write (atomically)"),
        fmt: Optional[str] = typer.Option(None, "--format", help="jsonl, csv or text (default: from IN's suffix)"),
        field: Optional[list[str]] = typer.Option(None, "--field", help="JSONL key / CSV column to scan; repeat for "
                                                                       "several (default: every string field)"),
        operator: Optional[list[str]] = typer.Option(None, "--operator", help="TYPE=OP with OP one of mask, tag, "
                                                     "hash, fpe; TYPE an entity type or 'default' (default: tag)"),
        key: Optional[Path] = typer.Option(None, "--key", help="key file for hash and fpe (>= 32 random bytes)"),
        generate_key: bool = typer.Option(False, "--generate-key", help="create --key FILE (new random key, mode "
                                                                        "0600) first; refuses to replace one"),
        summary: Optional[Path] = typer.Option(None, "--summary", help="write the summary JSON here"),
        spans: Optional[Path] = typer.Option(None, "--spans", help="positions of fpe values (default: "
                                                                   "OUT.fpe-spans.json); read by --reverse"),
        reverse: bool = typer.Option(False, "--reverse", help="decrypt the fpe values of a masked IN into --out "
                                                              "(needs --key and the spans file)"),
        threshold: float = typer.Option(0.3, "--threshold", min=0.0, max=1.0,
                                        help="Presidio score below which a match is ignored"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace --out (and --summary/spans) if they exist"),
    ) -> None:
        """Detect PII (emails, phones, cards, IBANs, IPs, national IDs, dates of birth, names in context) in IN
        and write OUT with each value masked, tagged, pseudonymized (keyed hash) or format-preserving encrypted."""
        from rich.table import Table

        from ..errors import SecquantError
        from ..privacy.masking import generate_key as _generate_key
        from ..privacy.masking import mask_file, unmask_file

        if generate_key:
            if key is None:
                raise SecquantError("--generate-key needs --key FILE (where to write the new key)")
            _generate_key(key)
            err.print(f"wrote a new key to {key} (mode 0600); keep it secret: it links pseudonyms and decrypts "
                      "fpe values", highlight=False, soft_wrap=True)
        if reverse:
            if key is None:
                raise SecquantError("--reverse needs --key FILE (the key the data was masked with)")
            if field or operator or summary:
                raise SecquantError("--reverse takes IN, --out, --key and optionally --spans; --field, --operator "
                                    "and --summary apply to masking")
            res = unmask_file(src, out_path, key, spans_path=spans, overwrite=overwrite)
            n = sum(res["decrypted"].values())
            err.print(f"decrypted {n} value(s) in {res['records']} record(s) -> {out_path}", highlight=False,
                      soft_wrap=True)
            return
        with RichProgress() as prog:
            s = mask_file(src, out_path, fmt=fmt, fields=field, operators=operator, key=key,
                          score_threshold=threshold, summary_path=summary, spans_path=spans, overwrite=overwrite,
                          progress=prog)
        t = Table(title=f"PII masked in {s['records']} record(s) of {src.name} -> {out_path}")
        t.add_column("entity type")
        t.add_column("found", justify="right")
        t.add_column("operator")
        for e, n in s["entities"].items():
            t.add_row(e, str(n), s["operators"][e])
        t.add_row("total", str(s["total_found"]), "")
        out.print(t)
        notes = []
        if s["fpe_fallback_to_hash"]:
            notes.append("too short for FF3-1, hashed instead (not reversible): "
                         + ", ".join(f"{e} {n}" for e, n in s["fpe_fallback_to_hash"].items()))
        if s.get("fpe_spans"):
            notes.append(f"fpe positions: {s['fpe_spans']}")
        if summary:
            notes.append(f"summary: {summary}")
        notes.append(s["detector"]["person"])
        for n in notes:
            err.print(n, highlight=False, soft_wrap=True)
