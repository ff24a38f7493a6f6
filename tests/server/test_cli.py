"""`secquant server ...` commands (in process) and `secquant serve` run for real by uvicorn."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx

from secquant.models.digits import splits

SECQUANT_BIN = Path(__file__).resolve().parents[2] / ".venv" / "bin" / "secquant"


def test_client_commands(cli, tmp_path, assert_user_error):
    db = tmp_path / "s.db"
    r = cli("server", "add-client", "alice", "--role", "admin", "--db", db)
    assert r.exit_code == 0, r.stderr
    key = r.stdout.strip()
    assert key.startswith("sq_") and len(r.stdout.splitlines()) == 1 and "shown only now" in r.stderr
    r = cli("server", "add-client", "bob", "--queries", "100", "--rate", "2", "--burst", "5", "--db", db)
    assert r.exit_code == 0
    rows = json.loads(cli("server", "list-clients", "--json", "--db", db).stdout)
    assert [(c["name"], c["role"], c["max_queries"], c["rate_per_s"], c["burst"]) for c in rows] == [
        ("alice", "admin", None, None, None), ("bob", "user", 100, 2.0, 5)]
    assert key not in json.dumps(rows) and "key_hash" not in rows[0]
    table = cli("server", "list-clients", "--db", db)
    assert table.exit_code == 0 and "alice" in table.stdout and "bob" in table.stdout
    r = cli("server", "set-budget", "bob", "--queries", "7", "--window", "60", "--db", db)
    assert r.exit_code == 0 and json.loads(r.stdout)["max_queries"] == 7 and json.loads(r.stdout)["window_s"] == 60
    new = cli("server", "rotate-key", "alice", "--db", db).stdout.strip()
    assert new.startswith("sq_") and new != key
    assert cli("server", "revoke", "bob", "--db", db).exit_code == 0
    from secquant.server import Store

    s = Store(db)
    assert s.authenticate(key) is None and s.authenticate(new).name == "alice"
    assert s.client("bob")["revoked"] is True
    s.audit(method="POST", route="/v1/predict", status=429, client_name="bob", input_sha256="cd" * 32)
    s.close()
    lines = cli("server", "audit-log", "--json", "--db", db).stdout.splitlines()
    assert json.loads(lines[0])["status"] == 429 and json.loads(lines[0])["input_sha256"] == "cd" * 32
    assert "429" in cli("server", "audit-log", "--client", "bob", "--db", db).stdout
    assert_user_error(cli("server", "add-client", "alice", "--db", db), contains=("already exists",))
    assert_user_error(cli("server", "add-client", "eve", "--role", "root", "--db", db), contains=("role",))
    assert_user_error(cli("server", "revoke", "nobody", "--db", db), contains=("no client named",))
    assert_user_error(cli("server", "set-budget", "alice", "--db", db), contains=("nothing to change",))
    assert_user_error(cli("server", "list-clients", "--db", "mysql://x@y/z"), contains=("only SQLite",))


def test_default_database_and_migrate(cli, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("SECQUANT_SERVER_DB", raising=False)
    r = cli("server", "migrate")
    assert r.exit_code == 0 and "revision 0002" in r.stderr
    assert (tmp_path / "secquant-server.db").is_file()


def test_serve_refuses_bad_keys(cli, sealed_digits, server_keys, tmp_path, assert_user_error):
    owner, other = server_keys
    r = cli("serve", sealed_digits, "--identity", owner.identity, "--verify-key", other.verify_key,
            "--db", tmp_path / "s.db", "--port", "1")
    assert_user_error(r, contains=("signature verification failed",))
    r = cli("serve", sealed_digits, "--identity", owner.identity, "--verify-key", owner.verify_key,
            "--db", tmp_path / "s.db", "--ssl-certfile", owner.verify_key)
    assert_user_error(r, contains=("--ssl-keyfile",))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_secquant_serve_answers_over_http(sealed_digits, server_keys, tmp_path):
    from secquant.server import Store

    owner, _ = server_keys
    db = tmp_path / "s.db"
    env = {**os.environ, "COLUMNS": "200"}
    s = Store(db)  # the same database the server process opens (the CLI commands are tested above)
    key = s.add_client("ann")
    s.close()
    port = _free_port()
    with open(tmp_path / "serve.log", "w") as log:
        proc = subprocess.Popen([str(SECQUANT_BIN), "serve", str(sealed_digits), "--identity", str(owner.identity),
                                 "--verify-key", str(owner.verify_key), "--db", str(db), "--port", str(port),
                                 "--top-k", "3", "--integrity-interval", "1", "--log-level", "warning"],
                                stdout=log, stderr=subprocess.STDOUT, env=env)  # the child keeps its own fd
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()
            try:
                if httpx.get(f"{base}/healthz", timeout=2).json() == {"status": "ok"}:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        head = httpx.head(f"{base}/healthz", timeout=5)  # HEAD, as load balancers probe
        assert head.status_code == 200 and head.content == b""
        x = splits()["test_x"][:8]
        assert httpx.post(f"{base}/v1/predict", json={"inputs": x.tolist()}).status_code == 401
        r = httpx.post(f"{base}/v1/predict", json={"inputs": x.tolist()}, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200
        preds = r.json()["predictions"]
        assert len(preds) == 8 and all(len(p["top"]) == 3 for p in preds)
        assert sum(p["label"] == t for p, t in zip(preds, splits()["test_y"][:8].tolist())) >= 7
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in text, text
    s = Store(db)
    statuses = [(e["route"], e["status"]) for e in s.audit_log()[::-1]]
    s.close()
    assert statuses == [("/healthz", 200)] * (len(statuses) - 2) + [("/v1/predict", 401), ("/v1/predict", 200)]


def test_serve_warns_about_keys_hashed_under_a_lost_secret(cli, sealed_digits, server_keys, tmp_path, monkeypatch):
    import uvicorn

    from secquant.server import Store

    owner, _ = server_keys
    db = tmp_path / "s.db"
    s = Store(db)
    s.add_client("ann")
    s.close()
    (tmp_path / "s.db.secret").unlink()  # lost: serve makes a new one, and ann's key cannot work
    ran = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: ran.append(kw))
    r = cli("serve", sealed_digits, "--identity", owner.identity, "--verify-key", owner.verify_key, "--db", db)
    assert r.exit_code == 0 and len(ran) == 1, r.stderr
    assert "1 client key(s) were hashed under another server secret" in " ".join(r.stderr.split())
