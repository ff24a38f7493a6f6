"""Shared by the benchmarks: the machine, the source state, CPU contention, and RESULTS.md sections."""

from __future__ import annotations

import hashlib
import os
import platform
import re
import time
from pathlib import Path


def cpu_counters() -> tuple[float, float]:
    """(busy CPU-seconds of the whole machine, CPU-seconds of this process incl. reaped children) so far."""
    try:
        f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        busy = sum(f[:8]) - f[3] - f[4]  # all minus idle and iowait
        mine = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        own = sum(int(x) for x in mine[11:15])  # utime stime cutime cstime
        hz = os.sysconf("SC_CLK_TCK")
        return busy / hz, own / hz
    except (OSError, ValueError, IndexError):
        return float("nan"), float("nan")


def cpu_model() -> str:
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        return m.group(1).strip() if m else "unknown CPU"
    except OSError:
        return "unknown CPU"


def machine_line(threads: int = 2) -> str:
    import torch

    return (f"{os.cpu_count()} cores, {cpu_model()} (per /proc/cpuinfo), torch.set_num_threads({threads}); "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def other_load(cpu_start: tuple[float, float], total_s: float) -> str:
    """CPU time other processes used since `cpu_start` (a cpu_counters() reading), in words."""
    busy, own = cpu_counters()
    other = (busy - cpu_start[0]) - (own - cpu_start[1])
    return (f"other processes used {max(other, 0.0):.0f} CPU-seconds during the {total_s:.0f} s run "
            f"(~{max(other, 0.0) / total_s:.2f} of the 2 cores on average; this run itself used "
            f"{own - cpu_start[1]:.0f} CPU-seconds)")


def source_fingerprint() -> str:
    """sha256 over secquant's .py sources (path + content), to tie the numbers to one source state."""
    import secquant

    root = Path(secquant.__file__).resolve().parent
    h = hashlib.sha256()
    files = sorted(root.rglob("*.py"))
    for f in files:
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    newest = max(files, key=lambda f: f.stat().st_mtime)
    return (f"secquant {getattr(secquant, '__version__', '?')} from {root}; sha256 of its {len(files)} .py files "
            f"{h.hexdigest()[:16]}; newest {newest.relative_to(root)} modified "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(newest.stat().st_mtime))}")


def replace_section(results_md: Path, heading: str, section: str) -> None:
    """Put `section` (starting with `## heading`) into results_md in place of the old one, or append it."""
    if not results_md.is_file():
        results_md.write_text("# secquant benchmark results\n\n" + section)
        return
    text = results_md.read_text()
    m = re.search(rf"^## {re.escape(heading)}[ \t]*\n", text, re.M)
    if m:
        nxt = re.search(r"^## ", text[m.end():], re.M)
        end = m.end() + nxt.start() if nxt else len(text)
        text = text[:m.start()] + section + ("\n" + text[end:] if nxt else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    results_md.write_text(text)
