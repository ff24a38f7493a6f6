"""What every command module shares: the consoles, one-line user errors, progress, passphrase prompts,
the options of factory models (--factory, --weights, --sample-shape, --sample-dtype) and small formatting
helpers. Command modules import from here, never from the package."""

from __future__ import annotations

import functools
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


class LineProgress:
    """Progress as plain lines, for stderr that is not a terminal (CI, logs, pipes), where a live bar shows
    nothing: `[  12.3s] calibrating: 8/8` (seconds since the command started) when a stage ends (its total
    reached, the next stage started, or the command done), and while a long stage runs at most one line
    every `interval` seconds (GPTQ's layers, not a line per batch). Stages that take less than `quiet`
    seconds print nothing: a quick run stays quiet."""

    interval = 5.0
    quiet = 1.0

    def __init__(self, console: Console, clock: Callable[[], float] = time.monotonic) -> None:
        self.console, self.clock = console, clock
        self.t0 = clock()
        self.running: list[dict[str, Any]] = []  # stages whose total is not reached (or that have none)

    def _line(self, st: dict[str, Any], now: float) -> None:
        count = f"{st['done']}/{st['total']}" if st["total"] else f"{st['done']} done"
        self.console.print(f"[{now - self.t0:6.1f}s] {one_line(st['label'], 120)}: {count}", markup=False,
                           highlight=False, soft_wrap=True)
        st["printed"], st["shown"] = now, st["done"]

    def _flush(self, now: float) -> None:
        """A line for each running stage with progress not shown yet (totals are often estimates)."""
        for st in self.running:
            if st["done"] != st["shown"] and now - st["start"] >= self.quiet:
                self._line(st, now)

    def __call__(self, label: str, total: int | None) -> Callable[[int], None]:
        now = self.clock()
        self._flush(now)
        st = {"label": label, "total": total, "done": 0, "shown": 0, "start": now, "printed": now}
        self.running.append(st)

        def advance(n: int) -> None:
            st["done"] += n
            now = self.clock()
            if st["total"] and st["done"] >= st["total"]:
                if st in self.running:
                    self.running.remove(st)
                    if now - st["start"] >= self.quiet:
                        self._line(st, now)
            elif st in self.running and now - st["printed"] >= self.interval:
                self._line(st, now)

        return advance

    def close(self) -> None:
        """The last line of the stages still running (stages without a total end with the command)."""
        self._flush(self.clock())
        self.running = []


class RichProgress:
    """Adapter from secquant's progress callbacks to the command's progress display on stderr: a rich
    progress bar on a terminal, plain progress lines (LineProgress) otherwise."""

    def __init__(self) -> None:
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), console=err, transient=True)
        self.lines = None if err.is_terminal else LineProgress(err)
        self.started = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.lines is not None:
            if exc[0] is None:  # after an error, the error line is the last word
                self.lines.close()
        elif self.started:  # started lazily: an early error prints no empty progress line
            self.progress.stop()
        return False

    def __call__(self, label: str, total: int | None):
        if self.lines is not None:
            return self.lines(label, total)
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


# -- factory models: one definition of each option, used by every command that builds or rebuilds one ------

FACTORY_HELP = ("confirm the package.module:factory a factory-built artifact names (secquant calls no code a "
                "manifest names unless you name it too)")
WEIGHTS_HELP = "float weights of a factory model (.safetensors, or a weights-only .pt/.bin)"
SAMPLE_SHAPE_HELP = ("a factory model's input: the shape of one sample without the batch dimension, e.g. 64 or "
                     "3,32,32 (default: its `sample_shape` attribute); recorded in the manifest")
SAMPLE_DTYPE_HELP = ("a factory model's input dtype: float32, int64 or int32 (default: its `sample_dtype` "
                     "attribute, else int64 when its first layer is an nn.Embedding, else float32)")


def factory_option(help: str = FACTORY_HELP) -> Any:
    return typer.Option(None, "--factory", help=help)


def weights_option(help: str = WEIGHTS_HELP) -> Any:
    return typer.Option(None, "--weights", help=help)


def sample_shape_option(help: str = SAMPLE_SHAPE_HELP) -> Any:
    return typer.Option(None, "--sample-shape", help=help)


def sample_dtype_option(help: str = SAMPLE_DTYPE_HELP) -> Any:
    return typer.Option(None, "--sample-dtype", help=help)


def parse_sample_shape(text: str | None) -> tuple[int, ...] | None:
    """'64' -> (64,), '3,32,32' or '3x32x32' -> (3, 32, 32); checked like the API's sample_shape=."""
    from ..models.inputs import check_sample_shape

    if text is None:
        return None
    parts = [p.strip() for p in re.split(r"[,x]", text.strip())]
    if not all(p.isdigit() for p in parts):
        raise SecquantError(f"--sample-shape {text[:40]!r}: give the shape of one sample without the batch "
                            "dimension, positive sizes separated by commas, e.g. 64 or 3,32,32")
    return check_sample_shape([int(p) for p in parts], "--sample-shape")


def parse_sample_dtype(text: str | None) -> str | None:
    from ..models.inputs import dtype_name

    return None if text is None else dtype_name(text.strip().lower(), "--sample-dtype")


def existing(path: Path | None, flag: str) -> str | None:
    """A file option's path as a string, refused (before any work) when it does not exist."""
    if path is None:
        return None
    if not Path(path).exists():
        raise SecquantError(f"{flag} {path}: no such file")
    return str(path)
