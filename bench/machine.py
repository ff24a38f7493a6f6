"""Shared by the benchmarks: CPU counters to report how much other processes competed for the machine."""

from __future__ import annotations

import os
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
