"""One MPC party as its own process: `python -m secquant.runtime.private.party --pid I ...`.

Each party reads only its own files: everyone the public program (`--public`), the client (pid 0) its
input codes (`--inputs`), the model owner (pid 1) the secret arrays (`--secrets`). Nothing is unpickled
from files (numpy with allow_pickle=False); peers are authenticated by MPyC's TLS mode (see tls.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .engine import CLIENT, OWNER, import_mpyc, run_program


def _write_json(path: Path, obj: dict) -> None:
    from ...artifact.fsutil import atomic_file

    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(obj))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="secquant-party")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--peers", required=True, help="host:port of parties 0,1,2, comma separated")
    ap.add_argument("--home", type=Path, required=True, help="directory holding .config/ (TLS) for this party")
    ap.add_argument("--public", type=Path, required=True)
    ap.add_argument("--secrets", type=Path)
    ap.add_argument("--inputs", type=Path)
    ap.add_argument("--result", type=Path)
    ap.add_argument("--sessions", type=int, default=1, help="sessions to serve (0: until stopped)")
    ap.add_argument("--reveal-logits", action="store_true")
    args = ap.parse_args(argv)
    public = json.loads(args.public.read_text())
    secrets = codes = None
    if args.pid == OWNER:
        with np.load(args.secrets, allow_pickle=False) as z:
            secrets = {k: z[k] for k in z.files}
    if args.pid == CLIENT:
        codes = np.load(args.inputs, allow_pickle=False)
    os.chdir(args.home)  # MPyC's --ssl reads .config/ from the working directory
    mpc_argv = [a for p in args.peers.split(",") for a in ("-P", p)] + ["-I", str(args.pid), "--ssl", "--no-log"]
    mpc = import_mpyc(mpc_argv)
    done = 0
    while args.sessions == 0 or done < args.sessions:
        try:
            if public.get("mode") == "fixed-point":  # the benchmark's peer (fixedpoint.py)
                from .fixedpoint import run_fixed_point

                res = mpc.run(run_fixed_point(mpc, public, secrets, codes))
            else:
                res = mpc.run(run_program(mpc, public, secrets, codes, args.reveal_logits))
        except ValueError as e:  # a refused session (e.g. batch too large): report it, keep serving
            print(f"party {args.pid}: session refused: {e}", file=sys.stderr, flush=True)
            if args.sessions:
                return 2
            continue
        done += 1
        if args.result is not None:
            _write_json(args.result, res)
        if args.sessions == 0:
            print(json.dumps({k: res[k] for k in ("pid", "samples", "seconds", "bytes_sent")}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
