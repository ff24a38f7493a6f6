"""Progress when stderr is not a terminal (CI, logs, pipes): plain lines, one per stage with the elapsed
time, throttled while a long stage runs; a rich bar only on a terminal."""

from __future__ import annotations

import io
import re

import pytest
import torch
from rich.console import Console
from safetensors.torch import save_file

from secquant.cli.common import LineProgress

LINE = re.compile(r"^\[\s*\d+\.\ds\] [^:]+: \d+(/\d+| done)$")


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def _lines(buf: io.StringIO) -> list[str]:
    return [ln for ln in buf.getvalue().splitlines() if ln.strip()]


def _display():
    buf, clock = io.StringIO(), Clock()
    return LineProgress(Console(file=buf, width=200), clock), buf, clock


def test_a_long_stage_prints_every_few_seconds_not_per_batch():
    lp, buf, clock = _display()
    tick = lp("GPTQ blocks", 200)
    for _ in range(200):  # 200 layers over 40 s: 0.2 s each
        clock.t += 0.2
        tick(1)
    lines = _lines(buf)
    assert all(LINE.match(ln) for ln in lines), lines
    assert 7 <= len(lines) <= 9, lines  # every 5 s, plus the end; not 200
    assert lines[-1] == "[  40.0s] GPTQ blocks: 200/200"


def test_one_line_per_stage_and_quick_stages_stay_quiet():
    lp, buf, clock = _display()
    quick = lp("collecting activations", 4)
    for _ in range(4):
        clock.t += 0.01
        quick(1)
    slow = lp("calibrating", 8)
    for _ in range(8):
        clock.t += 0.5
        slow(1)
    evaluating = lp("evaluating", None)  # no total: its line comes when the command ends
    clock.t += 3
    evaluating(500)
    assert _lines(buf) == ["[   4.0s] calibrating: 8/8"]
    lp.close()
    assert _lines(buf)[-1] == "[   7.0s] evaluating: 500 done"


def test_cli_prints_stage_lines_when_stderr_is_captured(tmp_path, cli, monkeypatch):
    """CliRunner's stderr is not a terminal: the quantize run logs its stages as lines."""
    from tiny_factory import tiny

    monkeypatch.setattr(LineProgress, "quiet", 0.0)  # this tiny run is fast: print every stage
    save_file(tiny().state_dict(), str(tmp_path / "w.safetensors"))
    save_file({"inputs": torch.randn(64, 6)}, str(tmp_path / "calib.safetensors"))
    r = cli("quantize", "tiny_factory:tiny", "--weights", tmp_path / "w.safetensors", "--preset", "w8a8",
            "--calib", tmp_path / "calib.safetensors", "--out", tmp_path / "q")
    assert r.exit_code == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("[")]
    assert any(re.match(r"^\[\s*\d+\.\ds\] loading model: 1/1$", ln) for ln in lines), r.stderr
    assert any(re.match(r"^\[\s*\d+\.\ds\] calibrating: \d+/\d+$", ln) for ln in lines), r.stderr
    assert all(LINE.match(ln) for ln in lines), lines
    assert "\r" not in r.stderr and "\x1b[" not in r.stderr  # no live bar redrawn into a log


@pytest.mark.parametrize("terminal", [False, True])
def test_rich_bar_only_on_a_terminal(monkeypatch, terminal):
    from secquant.cli import common

    monkeypatch.setattr(common.err, "_force_terminal", terminal)
    with common.RichProgress() as prog:
        assert (prog.lines is None) == terminal


def test_a_stage_short_of_its_estimated_total_ends_when_the_next_begins():
    lp, buf, clock = _display()
    collect = lp("collecting activations", 8)  # 8 batches estimated, the file held 2
    clock.t += 2
    collect(2)
    assert _lines(buf) == []
    lp("searching scales", 2)
    assert _lines(buf) == ["[   2.0s] collecting activations: 2/8"]
    lp.close()
    assert len(_lines(buf)) == 1  # shown once
