"""The server's acceptance bars: the OpenAPI spec validates and a schemathesis run finds no 5xx; every
protected route answers 401 without a key and 403 for the wrong role; budgets hold exactly under
concurrent clients of a live uvicorn server; audit rows equal requests made; bad input gets a clear
4xx (JSON, no traceback), and a sealed file that fails verification stops the server from starting."""

from __future__ import annotations

import json
import re
import socket
import threading
import time
from collections import Counter

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

from secquant.server import ServerConfig, create_app

OPEN = {"/healthz"}
USER_ROUTES = {"/v1/predict", "/v1/embed", "/v1/generate"}  # any other protected route is admin-only
TRACEBACK = re.compile(r"Traceback|File \"|\.py\", line|RuntimeError|sqlalchemy|sqlite3|torch\.", re.IGNORECASE)
ONE = [[0.0] * 64]


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def audit_count(store, **kw) -> int:
    return sum(1 for e in store.audit_log(limit=10000, **kw) if e["method"] != "EVENT")


def clean_4xx(r, *codes: int) -> None:
    """A 4xx (one of `codes` when given) with a JSON body carrying 'detail' and no traceback text."""
    assert 400 <= r.status_code < 500, (r.status_code, r.text[:500])
    if codes:
        assert r.status_code in codes, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("application/json"), r.headers
    assert "detail" in r.json(), r.text[:500]
    assert not TRACEBACK.search(r.text), r.text[:500]


@pytest.fixture
def app_and_keys(served, store_factory, sqlite_url):
    store = store_factory(sqlite_url)
    admin, user = store.add_client("sq-admin-7f3e", "admin"), store.add_client("ann", "user")
    # these tests send scores of bad keys from one address and want a 401 for each: the failed-auth
    # limit (a 429 after 20) is tested in tests/security/adversarial/test_server_auth_cost.py
    app = create_app(served, store, ServerConfig(integrity_interval=0, auth_failures_per_minute=None))
    return app, store, admin, user


def _operations(app) -> list[tuple[str, str]]:
    ops = []
    for r in app.routes:
        if isinstance(r, APIRoute) and r.include_in_schema:  # /openapi.json itself is not in the document
            ops += [(m, r.path) for m in sorted(r.methods)]
    return ops


# ---- OpenAPI + schemathesis --------------------------------------------------------------------------

def test_openapi_spec_validates_and_schemathesis_finds_no_5xx(app_and_keys):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis.errors import Unsatisfiable
    from schemathesis import GenerationMode

    app, store, admin, _ = app_and_keys
    spec = app.openapi()  # served only to admins (GET /openapi.json), checked below
    schema = schemathesis.openapi.from_dict(spec)
    schema.validate()  # raises on an invalid OpenAPI document
    assert {(m, p) for m, p in _operations(app)} == {
        (m.upper(), p) for p, item in spec["paths"].items() for m in item}
    seen: Counter = Counter()
    sent = 0
    with TestClient(app, raise_server_exceptions=False) as c:
        ops = [r.ok() for r in schema.get_all_operations()]
        assert len(ops) == len(_operations(app)) == 13  # GET and HEAD /healthz, 11 protected
        for op in ops:
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                @settings(max_examples=15, derandomize=True, deadline=None, database=None,
                          phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
                @given(case=op.as_strategy(generation_mode=mode))
                def run(case):
                    nonlocal sent
                    kw = case.as_transport_kwargs()
                    headers = {**(kw.pop("headers", None) or {}), **bearer(admin)}
                    kw.pop("url", None)
                    r = c.request(case.method, case.formatted_path, headers=headers,
                                  **{k: v for k, v in kw.items() if k in ("params", "json", "content", "data")})
                    sent += 1
                    seen[(case.operation.label, r.status_code)] += 1
                    assert r.status_code < 500, (case.operation.label, r.status_code, r.text[:300], kw)
                    assert not TRACEBACK.search(r.text), r.text[:300]
                    if r.status_code >= 400:
                        assert "detail" in r.json()

                try:
                    run()
                except Unsatisfiable:  # nothing to make invalid (no inputs, or only a free-form string in the path)
                    assert mode == GenerationMode.NEGATIVE, op.label
    assert sent >= 12 * 10
    assert any(s == 200 for (_, s) in seen)  # the run reached the handlers, not only validation
    assert audit_count(store) == sent  # every generated request left exactly one audit row


# ---- auth on every route -----------------------------------------------------------------------------

def test_every_protected_route_401_without_key_403_for_wrong_role(app_and_keys):
    app, store, admin, user = app_and_keys
    ops = _operations(app)
    assert {("GET", "/healthz"), ("HEAD", "/healthz")} <= set(ops) and len(ops) == 13
    store.add_client("gone")
    revoked = store.rotate_key("gone")
    store.revoke("gone")
    sent = 0
    with TestClient(app, raise_server_exceptions=False) as c:
        for path in ("/docs", "/redoc"):  # no HTML docs (they would need a browser to send a bearer key)
            assert c.get(path).status_code == 404 and c.get(path, headers=bearer(admin)).status_code == 404
            sent += 2
        # the OpenAPI document maps every route: admins only
        clean_4xx(c.get("/openapi.json"), 401)
        clean_4xx(c.get("/openapi.json", headers=bearer(revoked)), 401)
        clean_4xx(c.get("/openapi.json", headers=bearer(user)), 403)
        doc = c.get("/openapi.json", headers=bearer(admin))
        assert doc.status_code == 200 and doc.json() == app.openapi()
        assert doc.json()["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
        sent += 4
        for method, path in ops:
            url = path.replace("{name}", "ann")
            if path in OPEN:
                r = c.request(method, url)
                assert r.status_code == 200 and (method == "GET") == (r.content != b"")
                sent += 1
                continue
            # without a key, a revoked key, a malformed body: always 401 first, never 422 or a hint
            for h, body in [({}, None), (bearer(revoked), None), ({}, b"{not json"), ({}, b"\xff\xfe"),
                            (bearer("x" * 5000), None), ({"Authorization": "Basic cm9vdDpyb290"}, None)]:
                r = c.request(method, url, headers={"content-type": "application/json", **h}, content=body)
                sent += 1
                clean_4xx(r, 401)
                assert r.headers["www-authenticate"] == "Bearer"
            for body in (b"{}", b"{not json"):  # a user key on an admin route: 403 before the body is looked at
                r = c.request(method, url, headers={"content-type": "application/json", **bearer(user)}, content=body)
                sent += 1
                if path in USER_ROUTES:
                    assert r.status_code not in (401, 403), (path, r.text)
                else:
                    clean_4xx(r, 403)
    assert store.client("ann")["revoked"] is False  # no admin action went through for the user
    assert audit_count(store) == sent


# ---- budgets under concurrency, on a live uvicorn server ------------------------------------------------

class LiveServer:
    """uvicorn serving the app on 127.0.0.1 in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.02)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(20)


def test_budgets_are_exact_per_client_under_concurrency(db_url, served, store_factory):
    """4 clients, 2 threads each, hammer /v1/predict at once; each gets exactly its own budget."""
    store = store_factory(db_url)
    budgets = {"c1": 3, "c2": 7, "c3": 11, "c4": 16}
    keys = {n: store.add_client(n, "user", max_queries=q, window_s=3600) for n, q in budgets.items()}
    per_thread, threads_per_client = 14, 2
    results: dict[str, list[int]] = {n: [] for n in budgets}
    lock = threading.Lock()
    barrier = threading.Barrier(len(budgets) * threads_per_client)

    def hammer(url: str, name: str) -> None:
        codes = []
        with httpx.Client(base_url=url, headers=bearer(keys[name]), timeout=30) as c:
            barrier.wait()
            for _ in range(per_thread):
                codes.append(c.post("/v1/predict", json={"inputs": ONE}).status_code)
        with lock:
            results[name] += codes

    with LiveServer(create_app(served, store, ServerConfig(integrity_interval=0))) as url:
        ts = [threading.Thread(target=hammer, args=(url, n)) for n in budgets for _ in range(threads_per_client)]
        for t in ts:
            t.start()
        for t in ts:
            t.join(60)
        assert not any(t.is_alive() for t in ts)
    sent = per_thread * threads_per_client
    for name, n in budgets.items():
        got = Counter(results[name])
        assert got == Counter({200: n, 429: sent - n}), (name, got)
        c = store.client(name)
        assert (c["window_used"], c["queries_total"]) == (n, n), (name, c)
        # audit rows equal requests made, per client and per status
        rows = store.audit_log(limit=10000, client=name)
        assert len(rows) == sent and Counter(e["status"] for e in rows) == got
        assert all(e["route"] == "/v1/predict" and e["rows"] == 1 for e in rows)
    assert audit_count(store) == sent * len(budgets)


# ---- bad input -------------------------------------------------------------------------------------

def test_bad_input_gets_a_clear_4xx_never_a_5xx_or_traceback(served, store_factory, sqlite_url):
    store = store_factory(sqlite_url)
    admin, user = store.add_client("root", "admin"), store.add_client("ann", "user")
    revoked = store.add_client("gone")
    store.revoke("gone")
    cfg = ServerConfig(integrity_interval=0, max_batch=64, max_body_bytes=1 << 20)
    J = {"content-type": "application/json"}
    U, A = {**J, **bearer(user)}, {**J, **bearer(admin)}
    cases = [  # (method, path, headers, raw body, expected statuses)
        ("POST", "/v1/predict", U, b'{"inputs": [[0.0, 1.0', (422,)),  # malformed JSON
        ("POST", "/v1/predict", U, b"", (422,)),  # no body
        ("POST", "/v1/predict", U, b"[1, 2, 3]", (422,)),  # not an object
        ("POST", "/v1/predict", U, b'"inputs"', (422,)),
        ("POST", "/v1/predict", U, b"\xff\xfe\x00garbage", (400, 422)),  # not UTF-8
        ("POST", "/v1/predict", {**bearer(user), "content-type": "text/plain"}, json.dumps({"inputs": ONE}).encode(),
         (415, 422)),
        ("POST", "/v1/predict", U, json.dumps({"inputs": ONE, "model": "other"}).encode(), (422,)),  # unknown field
        ("POST", "/v1/predict", U, json.dumps({"input": ONE}).encode(), (422,)),  # misspelt field
        ("POST", "/v1/predict", U, json.dumps({"inputs": [[1.0, 2.0]]}).encode(), (422,)),  # wrong shape
        ("POST", "/v1/predict", U, json.dumps({"inputs": [[0.0] * 65]}).encode(), (422,)),
        ("POST", "/v1/predict", U, json.dumps({"inputs": [[0.0] * 64, [0.0] * 63]}).encode(), (422,)),  # ragged
        ("POST", "/v1/predict", U, json.dumps({"inputs": [0.0] * 64}).encode(), (422,)),  # no batch dimension
        ("POST", "/v1/predict", U, json.dumps({"inputs": []}).encode(), (422,)),
        ("POST", "/v1/predict", U, json.dumps({"inputs": [[[]]]}).encode(), (422,)),
        ("POST", "/v1/predict", U, json.dumps({"inputs": [["a"] * 64]}).encode(), (422,)),
        ("POST", "/v1/predict", U, json.dumps({"inputs": [[None] * 64]}).encode(), (422,)),
        ("POST", "/v1/predict", U, json.dumps({"inputs": [[{"x": 1}] * 64]}).encode(), (422,)),
        ("POST", "/v1/predict", U, b'{"inputs": [[NaN' + b", 0.0" * 63 + b"]]}", (422,)),
        ("POST", "/v1/predict", U, b'{"inputs": NaN}', (422,)),  # JSON the parser accepts, which no reply may echo
        ("POST", "/v1/embed", U, b'{"texts": [Infinity]}', (422,)),
        ("POST", "/v1/predict", U, b'{"inputs": [[1e400' + b", 0.0" * 63 + b"]]}", (422,)),
        ("POST", "/v1/predict", U, b'{"inputs": [[' + b"1" * 60 + b", 0.0" * 63 + b"]]}", (422,)),  # huge int
        ("POST", "/v1/predict", U, b'{"inputs": ' + b"[" * 50000 + b"]" * 50000 + b"}", (400, 422)),  # deep
        ("POST", "/v1/predict", U, json.dumps({"inputs": [[0.0] * 64] * 65}).encode(), (413,)),  # batch > 64
        ("POST", "/v1/predict", U, b'{"inputs": [[' + b"0.0," * 300000 + b"0.0]]}", (413,)),  # body > 1 MiB
        ("GET", "/v1/predict", bearer(user), None, (405,)),
        ("POST", "/v1/predict", {**J, **bearer(revoked)}, json.dumps({"inputs": ONE}).encode(), (401,)),
        ("POST", "/v1/embed", U, json.dumps({"texts": ["a"]}).encode(), (404,)),  # classifier served
        ("POST", "/v1/embed", U, json.dumps({"texts": "a"}).encode(), (422,)),
        ("GET", "/v1/nowhere", bearer(user), None, (404,)),
        ("GET", "/v1/audit?limit=abc", bearer(admin), None, (422,)),
        ("GET", "/v1/audit?limit=0", bearer(admin), None, (422,)),
        ("GET", "/v1/audit?status=" + "9" * 30, bearer(admin), None, (422,)),  # past 64-bit
        ("POST", "/v1/clients", A, json.dumps({"name": "bo", "role": "root"}).encode(), (422,)),
        ("POST", "/v1/clients", A, json.dumps({"name": "bo", "admin": True}).encode(), (422,)),  # unknown field
        ("POST", "/v1/clients", A, json.dumps({"name": "x" * 101}).encode(), (422,)),
        ("POST", "/v1/clients", A, json.dumps({"name": "bo\x00"}).encode(), (422,)),
        ("POST", "/v1/clients", A, json.dumps({"name": "bo", "max_queries": 2**70}).encode(), (422,)),
        ("POST", "/v1/clients", A, json.dumps({"name": "bo", "window_s": 2**40}).encode(), (422,)),
        ("POST", "/v1/clients", A, json.dumps({"name": "bo", "burst": 2**40}).encode(), (422,)),
        ("POST", "/v1/clients", A, b'{"name": "bo", "rate_per_s": NaN}', (422,)),
        ("POST", "/v1/clients", A, b'{"name": "bo", "rate_per_s": Infinity}', (422,)),
        ("POST", "/v1/clients", A, b'{"name": NaN}', (422,)),
        ("POST", "/v1/clients", A, json.dumps({"name": "bo", "rate_per_s": 0}).encode(), (422,)),
        ("PUT", "/v1/clients/ann/budget", A, json.dumps({"max_queries": -1}).encode(), (422,)),
        ("PUT", "/v1/clients/ann/budget", A, json.dumps({"max_queries": 2**64}).encode(), (422,)),
        ("PUT", "/v1/clients/ann/budget", A, json.dumps({"queries": 5}).encode(), (422,)),  # unknown field
        ("PUT", "/v1/clients/nobody/budget", A, json.dumps({"max_queries": 5}).encode(), (404,)),
        ("POST", "/v1/clients/nobody/rotate", bearer(admin), None, (404,)),
    ]
    with TestClient(create_app(served, store, cfg), raise_server_exceptions=False) as c:
        for method, path, headers, body, codes in cases:
            r = c.request(method, path, headers=headers, content=body)
            try:
                clean_4xx(r, *codes)
            except AssertionError as e:
                raise AssertionError(f"{method} {path} {(body or b'')[:80]!r}: {e}") from None
        # nothing above changed a client or spent a budget
        assert [x["name"] for x in store.list_clients()] == ["root", "ann", "gone"]
        assert store.client("ann")["queries_total"] == 0 and store.client("ann")["max_queries"] is None
        assert c.post("/v1/predict", json={"inputs": ONE}, headers=bearer(user)).status_code == 200
    assert audit_count(store) == len(cases) + 1


def test_a_sealed_file_that_fails_verification_refuses_to_start(cli, sealed_digits, server_keys, tmp_path,
                                                                assert_user_error):
    owner, _ = server_keys
    data = bytearray(sealed_digits.read_bytes())
    data[len(data) // 2] ^= 0x01
    bad = tmp_path / "tampered.age"
    bad.write_bytes(bytes(data))
    r = cli("serve", bad, "--identity", owner.identity, "--verify-key", owner.verify_key,
            "--db", tmp_path / "s.db", "--port", "1")
    assert_user_error(r)
    trunc = tmp_path / "truncated.age"
    trunc.write_bytes(sealed_digits.read_bytes()[:1000])
    assert_user_error(cli("serve", trunc, "--identity", owner.identity, "--verify-key", owner.verify_key,
                          "--db", tmp_path / "s.db", "--port", "1"))
