"""Serving: the model owner (party 1) and the helper (party 2) run as long-lived processes; a client
(party 0) queries with only its own input, its TLS identity and the public program.

`prepare_service` writes the client bundle (public.json, peers.json, the client's TLS key and
certificate, the CA certificate) and the servers' private directory (their TLS material; the owner's
secret arrays). The CA key that signed the three certificates is never written anywhere.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ...artifact.fsutil import atomic_dir
from ...errors import SecquantError
from .compile import encode_inputs
from .launch import _tail, party_command
from .program import Program
from .tls import issue_party_certificates


def prepare_service(prog: Program, bundle: Path, host: str = "127.0.0.1", base_port: int = 11365,
                    overwrite: bool = False) -> tuple[Path, list[str]]:
    """Write the client bundle at `bundle` and the servers' files into a fresh private directory; return
    (that directory, the parties' host:port list). Every party listens on base_port + its index."""
    if not 1024 <= base_port <= 65533:
        raise SecquantError("--base-port must be between 1024 and 65533 (three consecutive ports are used)")
    peers = [f"{host}:{base_port + i}" for i in range(3)]
    server = Path(tempfile.mkdtemp(prefix="secquant-private-serve-"))
    try:
        with atomic_dir(Path(bundle), overwrite) as tmp:
            issue_party_certificates([tmp, server / "party1", server / "party2"])
            (tmp / "public.json").write_text(prog.public_json())
            (tmp / "peers.json").write_text(json.dumps({"peers": peers}))
        (server / "public.json").write_text(prog.public_json())
        np.savez(server / "party1" / "secrets.npz", **prog.secrets)
    except BaseException:
        shutil.rmtree(server, ignore_errors=True)
        raise
    return server, peers


def serve(server: Path, peers: list[str], sessions: int = 0, log=print) -> int:
    """Run parties 1 and 2 until `sessions` queries were answered (0: until interrupted)."""
    procs = []
    try:
        for pid in (1, 2):
            home = server / f"party{pid}"
            cmd = party_command(pid, peers, home, server / "public.json", sessions=sessions,
                                secrets=home / "secrets.npz" if pid == 1 else None)
            with open(home / "stderr.txt", "wb") as err:
                procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=err, stdout=subprocess.PIPE,
                                              text=True))
        log(f"parties 1 (model owner) and 2 (helper) listening on {peers[1]} and {peers[2]}")
        for p in procs:
            for line in p.stdout:
                log(line.rstrip())
        rcs = [p.wait() for p in procs]
        if any(rcs):
            bad = rcs.index(next(r for r in rcs if r))
            raise SecquantError(f"party {bad + 1} stopped (exit {rcs[bad]}): "
                                f"{_tail(server / f'party{bad + 1}' / 'stderr.txt')}")
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        shutil.rmtree(server, ignore_errors=True)


def query(bundle: Path, x: torch.Tensor, timeout: float = 600.0) -> dict:
    """The client: quantize x locally, secret-share it with the servers, receive only the labels."""
    bundle = Path(bundle)
    try:
        public = json.loads((bundle / "public.json").read_text())
        peers = json.loads((bundle / "peers.json").read_text())["peers"]
    except (OSError, ValueError, KeyError) as e:
        raise SecquantError(f"{bundle} is not a client bundle written by `secquant private-serve` ({e})") from None
    codes = encode_inputs(public["input"], x)
    work = Path(tempfile.mkdtemp(prefix="secquant-private-query-"))
    try:
        np.save(work / "inputs.npy", codes)
        cmd = party_command(0, peers, bundle.resolve(), bundle.resolve() / "public.json", inputs=work / "inputs.npy",
                            result=work / "result.json")
        t0 = time.perf_counter()
        with open(work / "stderr.txt", "wb") as err:
            try:
                rc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    timeout=timeout).returncode
            except subprocess.TimeoutExpired:
                raise SecquantError(f"no answer from the servers at {peers[1]}, {peers[2]} within {timeout:.0f} s: "
                                    "is `secquant private-serve` running?") from None
        if rc != 0:
            raise SecquantError(f"the private query failed (exit {rc}): {_tail(work / 'stderr.txt')}")
        res = json.loads((work / "result.json").read_text())
        res["wall_seconds"] = time.perf_counter() - t0
        return res
    finally:
        shutil.rmtree(work, ignore_errors=True)
