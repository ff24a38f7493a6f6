"""Load test of the inference server on loopback: MiniLM embeddings at batch 1.

Builds a sealed builtin:minilm artifact (w8a8-dynamic, exported to ONNX so the ONNX Runtime backend
serves it), starts `secquant serve` on 127.0.0.1, adds a user client with no budget, then runs a
bounded load test: `--clients` threads, each with its own httpx connection, POST /v1/embed with one
sentence for `--seconds` seconds (after a short warm-up). Reports sustained requests per second,
p50/p99 latency and the error count as JSON lines, and writes a "## Server load" section to
bench/results_server.md.

    .venv/bin/python bench/server_load.py [--seconds 30] [--clients 4] [--threads 1]

Every request passes the whole server path: key check (one HMAC), budget update in SQLite, the ORT
forward pass and one audit row.

With `--bogus N` it measures instead what a flood of bad keys does to a valid client (issue 13
item 5; bar: the valid client's median latency under N = 64 concurrent bogus-key clients stays
within 2x of idle). For each scenario (`--scenarios`: default, no-delay = refused addresses answered
at once, no-limit = no failed-auth limit at all) a fresh server starts; one valid client sends
POST /v1/embed back to back from 127.0.0.1 while idle (`--phase` seconds), then while N bogus
clients, each on its own loopback address 127.0.1.x and keep-alive connection, send random
well-formed keys as fast as the server answers them (after a `--ramp` not counted), then idle again.
The bogus clients run in another process (asyncio), so they do not share the valid client's GIL.
Reports the valid client's p50/p90 per phase, the flood/idle ratio, the bogus requests' statuses,
and the server's resident memory (VmRSS idle, VmHWM peak) as JSON lines, and writes
bench/results_server_flood.md.

    .venv/bin/python bench/server_load.py --bogus 64 [--phase 15] [--ramp 3] [--scenarios default,no-delay]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from machine import cpu_counters

ROOT = Path(__file__).resolve().parents[1]
SENTENCES = ["The quick brown fox jumps over the lazy dog.", "Secure inference keeps the weights sealed.",
             "How many requests per second can one server answer?", "A short one."]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build(tmp: Path, recipe: str) -> tuple[Path, object]:
    import secquant
    from secquant.runtime import export_onnx
    from secquant.security import keygen, seal

    art = tmp / "minilm"
    t0 = time.perf_counter()
    secquant.quantize("builtin:minilm", recipe, out=art)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(art)
    keys = keygen(tmp / "owner")
    sealed = seal(art, [keys.recipient.read_text().strip()], keys.sign_key, tmp / "minilm.age")
    log(f"quantized, exported and sealed in {time.perf_counter() - t0:.1f} s")
    return sealed, keys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> str:
    exe = Path(sys.executable).with_name("secquant")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "secquant"]
    return subprocess.run(cmd + list(args), check=True, capture_output=True, text=True).stdout


def worker(url: str, key: str, stop_at: float, warm_until: float, lat: list, errors: list, statuses: dict) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    i = 0
    with httpx.Client(base_url=url, headers=headers, timeout=30) as c:
        while True:
            t0 = time.perf_counter()
            if t0 >= stop_at:
                return
            body = {"texts": [SENTENCES[i % len(SENTENCES)]]}
            i += 1
            try:
                r = c.post("/v1/embed", json=body)
                code = r.status_code
                ok = code == 200 and len(r.json()["embeddings"]) == 1
            except Exception as e:  # noqa: BLE001 - counted, not fatal
                code, ok = type(e).__name__, False
            t1 = time.perf_counter()
            if t0 < warm_until:
                continue
            statuses[code] = statuses.get(code, 0) + 1
            if ok:
                lat.append((t1, t1 - t0))
            else:
                errors.append(code)


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def start_server(sealed: Path, keys, db: str, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    """`secquant serve` on a free loopback port; returns (process, base URL) once /healthz answers."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).with_name("secquant")
    cmd = [str(exe), "serve", str(sealed), "--identity", str(keys.identity), "--verify-key", str(keys.verify_key),
           "--db", db, "--port", str(port), "--threads", str(threads), "--log-level", "warning", *extra]
    log("starting: " + " ".join(cmd))
    srv = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while True:
        if srv.poll() is not None:
            raise SystemExit(f"the server exited ({srv.returncode}):\n{srv.stdout.read()}")
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return srv, url
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            srv.kill()
            raise SystemExit("the server did not come up in 180 s")
        time.sleep(0.5)


def stop_server(srv: subprocess.Popen) -> None:
    srv.terminate()
    try:
        srv.wait(20)
    except subprocess.TimeoutExpired:
        srv.kill()
        srv.wait()


def proc_status(pid: int) -> dict[str, float]:
    """VmRSS and VmHWM (peak resident memory) of a process, in MiB."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            k, _, v = line.partition(":")
            if k in ("VmRSS", "VmHWM"):
                out[k] = round(int(v.split()[0]) / 1024, 1)
    except (OSError, ValueError):
        pass
    return out


def bogus_key() -> str:
    return f"sq_{secrets.token_hex(6)}_{secrets.token_urlsafe(32)}"


async def _bogus_flood(url: str, clients: int, seconds: float) -> dict:
    """`clients` connections, each from its own loopback address, sending bad keys back to back."""
    stop_at = time.monotonic() + seconds
    statuses: dict[str, int] = {}

    async def one(i: int) -> None:
        transport = httpx.AsyncHTTPTransport(local_address=f"127.0.1.{i + 1}")
        async with httpx.AsyncClient(base_url=url, transport=transport, timeout=30) as c:
            while time.monotonic() < stop_at:
                try:
                    r = await c.post("/v1/embed", json={"texts": ["x"]},
                                     headers={"Authorization": f"Bearer {bogus_key()}"})
                    code = str(r.status_code)
                except httpx.HTTPError as e:
                    code = type(e).__name__
                statuses[code] = statuses.get(code, 0) + 1

    await asyncio.gather(*(one(i) for i in range(clients)))
    return statuses


def bogus_worker(url: str, clients: int, seconds: float) -> None:
    t0 = time.monotonic()
    statuses = asyncio.run(_bogus_flood(url, clients, seconds))
    print(json.dumps({"statuses": statuses, "seconds": round(time.monotonic() - t0, 2)}), flush=True)


def valid_client(url: str, key: str, seconds: float) -> list[tuple[float, float]]:
    """(start time, latency) of each request one valid client sends back to back for `seconds`."""
    out = []
    stop_at = time.perf_counter() + seconds
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as c:
        i = 0
        while (t0 := time.perf_counter()) < stop_at:
            r = c.post("/v1/embed", json={"texts": [SENTENCES[i % len(SENTENCES)]]})
            i += 1
            if r.status_code != 200:
                raise SystemExit(f"the valid client got {r.status_code}: {r.text[:200]}")
            out.append((t0, time.perf_counter() - t0))
    return out


SCENARIOS = {"default": [], "no-delay": ["--auth-refusal-delay", "0"], "no-limit": ["--auth-failure-limit", "0"],
             "old": []}


def flood(a, sealed: Path, keys, tmp: Path) -> list[dict]:
    results = []
    for name in a.scenarios.split(","):
        db = str(tmp / f"flood-{name}.db")
        key = cli("server", "add-client", "probe", "--role", "user", "--db", db).strip().split()[-1]
        srv, url = start_server(sealed, keys, db, a.threads, SCENARIOS[name])
        try:
            valid_client(url, key, 2.0)  # warm-up
            mem_idle = proc_status(srv.pid)
            idle1 = valid_client(url, key, a.phase)
            cpu0 = _proc_cpu(srv.pid)
            worker = subprocess.Popen([sys.executable, __file__, "--bogus-worker", url, "--bogus", str(a.bogus),
                                       "--phase", str(a.ramp + a.phase)], stdout=subprocess.PIPE, text=True)
            t_start = time.perf_counter()
            during = valid_client(url, key, a.ramp + a.phase)
            out, _ = worker.communicate(timeout=120)
            cpu1 = _proc_cpu(srv.pid)
            bogus = json.loads(out.strip().splitlines()[-1])
            idle2 = valid_client(url, key, a.phase)
            mem_end = proc_status(srv.pid)
        finally:
            stop_server(srv)
        ramp = [d for t, d in during if t < t_start + a.ramp]
        flooded = [d for t, d in during if t >= t_start + a.ramp]
        idle = [d for _, d in idle1] + [d for _, d in idle2]
        p50 = lambda xs: round(1000 * statistics.median(xs), 2) if xs else None  # noqa: E731
        p90 = lambda xs: round(1000 * pct(xs, 0.90), 2) if xs else None  # noqa: E731
        n_bogus = sum(bogus["statuses"].values())
        r = {"bench": "server_auth_flood", "scenario": name, "server_flags": " ".join(SCENARIOS[name]) or "(defaults)",
             "bogus_clients": a.bogus, "phase_s": a.phase, "ramp_s": a.ramp,
             "idle_p50_ms": p50(idle), "idle_p90_ms": p90(idle),
             "idle_before_p50_ms": p50([d for _, d in idle1]), "idle_after_p50_ms": p50([d for _, d in idle2]),
             "ramp_p50_ms": p50(ramp), "flood_p50_ms": p50(flooded), "flood_p90_ms": p90(flooded),
             "flood_requests_ok": len(flooded), "ratio_p50": round(p50(flooded) / p50(idle), 2) if flooded else None,
             "bar_ratio": 2.0, "bogus_requests": n_bogus, "bogus_rps": round(n_bogus / bogus["seconds"], 1),
             "bogus_statuses": bogus["statuses"], "server_cpu_s_during_flood": round(cpu1 - cpu0, 1),
             "server_rss_idle_mib": mem_idle.get("VmRSS"), "server_rss_peak_mib": mem_end.get("VmHWM"),
             "cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()]}
        r["pass"] = r["ratio_p50"] is not None and r["ratio_p50"] <= 2.0
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


def write_flood_section(a, results: list[dict]) -> None:
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = (f".venv/bin/python bench/server_load.py --bogus {a.bogus} --phase {a.phase:g} --ramp {a.ramp:g} "
           f"--scenarios {a.scenarios}")
    rows = "\n".join(
        f"| {r['scenario']} | `{r['server_flags']}` | {r['idle_p50_ms']} ms | {r['flood_p50_ms']} ms | "
        f"{r['ratio_p50']} | {r['flood_p90_ms']} ms | {r['ramp_p50_ms']} ms | {r['bogus_rps']} | "
        f"{', '.join(f'{k}: {v}' for k, v in sorted(r['bogus_statuses'].items()))} | {r['server_rss_idle_mib']} / "
        f"{r['server_rss_peak_mib']} MiB | {'yes' if r['pass'] else 'no'} |" for r in results)
    md = f"""## Server under a flood of bad API keys

`{cmd}` ({when}; {os.cpu_count()} CPUs, {_cpu_name()}; Python {platform.python_version()}).

One valid client sends POST /v1/embed (builtin:minilm `{a.recipe}`, ONNX Runtime, one sentence)
back to back from 127.0.0.1: {a.phase:g} s idle, then {a.ramp:g} s + {a.phase:g} s while {a.bogus}
bogus clients (another process, one keep-alive connection each, each from its own address
127.0.1.x) send random well-formed keys as fast as they are answered, then {a.phase:g} s idle
again. Idle p50 is over both idle phases; the flood p50 leaves out the first {a.ramp:g} s (when
each new address still spends its allowance of bad keys; their p50 is the "ramp" column). Bar:
flood p50 within 2x of idle p50.

| scenario | serve flags | idle p50 | flood p50 | ratio | flood p90 | ramp p50 | bogus req/s | bogus statuses | server RSS idle / peak | bar |
|---|---|---:|---:|---:|---:|---:|---:|---|---:|---|
{rows}
"""
    out = a.out.with_name("results_server_flood.md")
    out.write_text(md)
    log(f"wrote {out}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--bogus-worker":
        ap = argparse.ArgumentParser()
        ap.add_argument("--bogus-worker")
        ap.add_argument("--bogus", type=int)
        ap.add_argument("--phase", type=float)
        w = ap.parse_args()
        return bogus_worker(w.bogus_worker, w.bogus, w.phase)
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=30.0, help="measured duration")
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of requests not counted")
    ap.add_argument("--clients", type=int, default=4, help="concurrent client threads")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads of the server")
    ap.add_argument("--recipe", default="w8a8-dynamic")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results_server.md")
    ap.add_argument("--bogus", type=int, default=0, help="flood mode: this many concurrent bogus-key clients")
    ap.add_argument("--phase", type=float, default=15.0, help="flood mode: seconds per measured phase")
    ap.add_argument("--ramp", type=float, default=3.0, help="flood mode: seconds of flood not counted")
    ap.add_argument("--scenarios", default="default,no-delay",
                    help=f"flood mode: comma-separated, of {', '.join(SCENARIOS)} ('old': a server without the "
                         "--auth-* options, e.g. an earlier secquant on PYTHONPATH)")
    a = ap.parse_args()

    with tempfile.TemporaryDirectory(prefix="secquant-server-load-") as td:
        tmp = Path(td)
        sealed, keys = build(tmp, a.recipe)
        if a.bogus:
            return write_flood_section(a, flood(a, sealed, keys, tmp))
        db = str(tmp / "server.db")
        key = cli("server", "add-client", "loadtest", "--role", "user", "--db", db).strip().split()[-1]
        if not key.startswith("sq_"):
            raise SystemExit(f"could not read the API key from add-client's output: {key!r}")
        srv, url = start_server(sealed, keys, db, a.threads, [])
        try:
            with httpx.Client(base_url=url) as c:
                r = c.post("/v1/embed", json={"texts": ["hello"]}, headers={"Authorization": f"Bearer {key}"})
                r.raise_for_status()
                dim = r.json()["dim"]
            log(f"server up (dim {dim}); {a.clients} clients, {a.warmup:.0f} s warm-up + {a.seconds:.0f} s")
            load0 = os.getloadavg()
            busy0, own0 = cpu_counters()
            srv_cpu0 = _proc_cpu(srv.pid)
            start = time.perf_counter()
            warm_until = start + a.warmup
            stop_at = warm_until + a.seconds
            lat: list = []
            errors: list = []
            statuses: dict = {}
            ts = [threading.Thread(target=worker, args=(url, key, stop_at, warm_until, lat, errors, statuses))
                  for _ in range(a.clients)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
            window = time.perf_counter() - start
            busy1, own1 = cpu_counters()
            srv_cpu1 = _proc_cpu(srv.pid)
            load1 = os.getloadavg()
        finally:
            stop_server(srv)
    lats = [d for _, d in lat]
    measured = a.seconds
    n = len(lats)
    wall = measured  # requests that started in the measured span / its length
    server_cpu = srv_cpu1 - srv_cpu0
    other = (busy1 - busy0) - (own1 - own0) - server_cpu
    res = {
        "bench": "server_load", "model": "builtin:minilm", "recipe": a.recipe, "backend": "onnxruntime",
        "route": "/v1/embed", "batch": 1, "clients": a.clients, "ort_threads": a.threads, "seconds": measured,
        "requests_ok": n, "errors": len(errors), "statuses": {str(k): v for k, v in statuses.items()},
        "rps": round(n / wall, 2), "p50_ms": round(1000 * pct(lats, 0.50), 2) if n else None,
        "p99_ms": round(1000 * pct(lats, 0.99), 2) if n else None,
        "mean_ms": round(1000 * statistics.fmean(lats), 2) if n else None,
        "server_cpu_s": round(server_cpu, 1), "other_processes_cpu_s": round(other, 1),
        "loadavg_before": [round(x, 2) for x in load0], "loadavg_after": [round(x, 2) for x in load1],
        "cpus": os.cpu_count(), "window_s": round(window, 1),
    }
    print(json.dumps(res), flush=True)
    write_section(a, res)
    log(f"wrote {a.out}")


def _proc_cpu(pid: int) -> float:
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return sum(int(x) for x in f[11:15]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return float("nan")


def write_section(a, r: dict) -> None:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    when = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    cmd = (f".venv/bin/python bench/server_load.py --seconds {a.seconds:g} --clients {a.clients} "
           f"--threads {a.threads}")
    md = f"""## Server load

`{cmd}` ({when}; {r['cpus']} CPUs, {cpu}; Python {platform.python_version()}).

`secquant serve` on 127.0.0.1 (uvicorn, one worker process, ONNX Runtime backend with {r['ort_threads']}
intra-op thread(s), SQLite database) serving builtin:minilm quantized with `{r['recipe']}`, exported to
ONNX and sealed. {r['clients']} client threads (httpx, keep-alive, one connection each, same machine)
send POST /v1/embed with one sentence per request, back to back, for {r['seconds']:g} s after a
{a.warmup:g} s warm-up. Each request goes the whole way: bearer key check, budget update in the
database (the client is unlimited, the row is still counted), the forward pass, one audit row.

| requests OK | errors | sustained req/s | p50 latency | p99 latency | mean latency |
|---:|---:|---:|---:|---:|---:|
| {r['requests_ok']} | {r['errors']} | {r['rps']} | {r['p50_ms']} ms | {r['p99_ms']} ms | {r['mean_ms']} ms |

Contention: load average {r['loadavg_before'][0]} before, {r['loadavg_after'][0]} after (1-minute);
over the {r['window_s']:g} s of the run (warm-up included) the server process used {r['server_cpu_s']} CPU-s and
other processes (not the server, not the load generator) {r['other_processes_cpu_s']} CPU-s of the
machine's {r['cpus']} x {r['window_s']:g} = {r['cpus'] * r['window_s']:.0f} CPU-s. The load generator shares the
CPUs with the server, so these numbers are a floor for a dedicated machine; latency is measured by
the client and includes queueing behind the other {r['clients'] - 1} clients.
"""
    a.out.write_text(md)


if __name__ == "__main__":
    main()
