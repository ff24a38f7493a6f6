"""What every command module shares: the consoles, one-line user errors, progress, passphrase prompts,
and small formatting helpers. Command modules import from here, never from the package."""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import SecquantError

# Tables stay legible when piped (rich assumes 80 columns off a terminal).
err = Console(stderr=True, width=None if sys.stderr.isatty() else 160)
out = Console(width=None if sys.stdout.isatty() else 160)

MAX_ERROR_CHARS = 400


_CONTROL = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]|[\x00-\x1f\x7f-\x9f]")  # ANSI sequences, C0, DEL, C1


def one_line(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """A message fit for a terminal: no control characters or escape sequences (a file name or manifest
    field can carry them), one line, at most `limit` characters."""
    text = " ".join(_CONTROL.sub(" ", text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def user_errors(fn):
    """Turn SecquantError into `error: ...` on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SecquantError as e:
            err.print(f"[bold red]error:[/] {escape(one_line(str(e)))}", highlight=False, markup=True, soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            err.print("interrupted; nothing was written")
            raise typer.Exit(130) from None

    return wrapper


class RichProgress:
    """Adapter from secquant's progress callbacks to one rich progress display on stderr."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, transient=True)
        self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.started:  # started lazily: an early error prints no empty progress line
            self.progress.stop()
        return False

    def __call__(self, label: str, total: int | None):
        if not self.started:
            self.progress.start()
            self.started = True
        task = self.progress.add_task(label, total=total)
        return lambda n: self.progress.advance(task, n)


def print_privacy(qm) -> None:
    """The privacy ledger in a line per entry, and the private file's commitment key (shown once, stored nowhere)."""
    for e in qm.manifest.privacy.entries:
        if e["epsilon"] == 0:
            err.print(f"privacy: {e['stage']}. {e['statement']}", highlight=False, soft_wrap=True)
            continue
        err.print(f"privacy: spent epsilon={e['epsilon']:g}, delta={e['delta']:g} on about {e['num_samples_dp']} "
                  f"samples (a DP count; {e['stage']})", highlight=False, soft_wrap=True)
    if qm.source_commitment_key:
        err.print(f"commitment key of the private file (kept nowhere; with it you can prove which file this "
                  f"artifact was made from): {qm.source_commitment_key}", highlight=False, soft_wrap=True)


MIN_RELEASE_HELP = ("refuse a sealed model whose signed release number is below this (or that has none): "
                    "no rollback to an older release")


def describe_release(opened) -> str:
    """'release N (sealed T)' for an opened artifact directory or a loaded model (QuantizedModel)."""
    from ..security import read_release

    rel = read_release(opened) if isinstance(opened, (str, Path)) else getattr(opened, "release", None)
    return rel.describe() if rel is not None else "no release number"


def read_passphrase(ask: bool, confirm: bool = False) -> str | None:
    """From $SECQUANT_PASSPHRASE, or prompted (hidden) when asked for."""
    env = os.environ.get("SECQUANT_PASSPHRASE")
    if env:
        return env
    if ask:
        return typer.prompt("passphrase", hide_input=True, confirmation_prompt=confirm)
    return None


def parse_size(text: str) -> int:
    """'5MB', '800kB', '123456' -> bytes (decimal units)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        raise SecquantError(f"--size-budget {text!r}: give bytes, e.g. 5MB, 800kB or 123456") from None
    if unit not in units or value <= 0:
        raise SecquantError(f"--size-budget {text!r}: give bytes, e.g. 5MB, 800kB or 123456")
    return int(value * units[unit])
