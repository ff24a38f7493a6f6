"""Start the parties as local processes on 127.0.0.1 ports and collect what each reports."""

from __future__ import annotations

import json
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ...errors import SecquantError
from .program import Program
from .tls import issue_party_certificates

PARTIES = 3


def free_ports(n: int) -> list[int]:
    """n distinct ports free on 127.0.0.1 now (the parties bind them right after)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def party_command(pid: int, peers: list[str], home: Path, public: Path, *, secrets: Path | None = None,
                  inputs: Path | None = None, result: Path | None = None, sessions: int = 1,
                  reveal_logits: bool = False) -> list[str]:
    cmd = [sys.executable, "-m", "secquant.runtime.private.party", "--pid", str(pid), "--peers", ",".join(peers),
           "--home", str(home), "--public", str(public), "--sessions", str(sessions)]
    for flag, path in (("--secrets", secrets), ("--inputs", inputs), ("--result", result)):
        if path is not None:
            cmd += [flag, str(path)]
    return cmd + (["--reveal-logits"] if reveal_logits else [])


def _tail(path: Path, n: int = 2) -> str:
    """The first exception line a party printed (its cause, not the event loop's aftermath), else its last lines."""
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    errors = [ln for ln in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", ln)]
    return errors[0] if errors else " | ".join(lines[-n:])


def run_local(prog: Program | Any, codes: np.ndarray, *, reveal_logits: bool = False, timeout: float = 600.0) -> dict:
    """Run `prog` on input codes [N, D] with three local party processes; returns the client's result
    with `bytes_total` (all parties) and `seconds` (the client's wall time from connection to output)."""
    root = Path(tempfile.mkdtemp(prefix="secquant-mpc-"))
    procs: list[subprocess.Popen] = []
    try:
        homes = [root / f"party{i}" for i in range(PARTIES)]
        issue_party_certificates(homes)
        public = root / "public.json"
        public.write_text(prog.public_json())
        np.savez(homes[1] / "secrets.npz", **prog.secrets)
        np.save(homes[0] / "inputs.npy", np.ascontiguousarray(codes))
        peers = [f"127.0.0.1:{p}" for p in free_ports(PARTIES)]
        for i, home in enumerate(homes):
            cmd = party_command(i, peers, home, public, result=home / "result.json", reveal_logits=reveal_logits,
                                secrets=home / "secrets.npz" if i == 1 else None,
                                inputs=home / "inputs.npy" if i == 0 else None)
            with open(home / "stderr.txt", "wb") as err:
                procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL))
        deadline = time.monotonic() + timeout
        for i, p in enumerate(procs):
            try:
                rc = p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise SecquantError(f"the secure computation did not finish within {timeout:.0f} s: use fewer "
                                    "--samples or a longer timeout") from None
            if rc != 0:
                raise SecquantError(f"MPC party {i} failed (exit {rc}): {_tail(homes[i] / 'stderr.txt')}")
        results = [json.loads((h / "result.json").read_text()) for h in homes]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        shutil.rmtree(root, ignore_errors=True)
    client = results[0]
    client["bytes_total"] = sum(r["bytes_sent"] for r in results)
    client["bytes_by_party"] = [r["bytes_sent"] for r in results]
    return client
