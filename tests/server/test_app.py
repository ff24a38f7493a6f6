"""The HTTP server (FastAPI TestClient): auth, roles, predictions, hardening, budgets, audit, integrity."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from secquant.models.digits import splits
from secquant.server import ServerConfig, create_app


@pytest.fixture
def make_server(served, store_factory, sqlite_url):
    """(TestClient factory, store, admin key, user key) on a fresh SQLite database."""
    store = store_factory(sqlite_url)
    admin, user = store.add_client("root", "admin"), store.add_client("ann", "user")
    clients = []

    def make(cfg: ServerConfig | None = None, model=None, st=None):
        c = TestClient(create_app(model or served, st or store, cfg or ServerConfig(integrity_interval=0)))
        c.__enter__()  # runs the lifespan (integrity check at start, periodic task)
        clients.append(c)
        return c

    yield make, store, admin, user
    for c in clients:
        c.__exit__(None, None, None)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


ROUTES = [("post", "/v1/predict", {"inputs": [[0.0] * 64]}), ("post", "/v1/embed", {"texts": ["x"]}),
          ("post", "/v1/generate", {"prompt": "x"}),
          ("get", "/v1/info", None), ("get", "/v1/clients", None), ("post", "/v1/clients", {"name": "x"}),
          ("post", "/v1/clients/ann/rotate", None), ("post", "/v1/clients/ann/revoke", None),
          ("put", "/v1/clients/ann/budget", {"max_queries": 1}), ("get", "/v1/audit", None),
          ("post", "/v1/integrity/check", None)]
ADMIN_ROUTES = [r for r in ROUTES if r[1] not in ("/v1/predict", "/v1/embed", "/v1/generate")]


def test_healthz_is_open_and_every_other_route_needs_a_valid_key(make_server):
    make, store, admin, user = make_server
    c = make(ServerConfig(integrity_interval=0, auth_failures_per_minute=None))  # 70 bad keys: 401 each, no 429
    assert c.get("/healthz").json() == {"status": "ok"}
    rotated = store.add_client("old")
    store.rotate_key("old")
    revoked = store.add_client("gone")
    store.revoke("gone")
    bad_headers = [{}, {"Authorization": "Basic abc"}, bearer("sq_000000000000_" + "A" * 43), bearer("nonsense"),
                   bearer(user[:-2] + "zz"), bearer(rotated), bearer(revoked)]
    for method, path, body in ROUTES:
        for h in bad_headers:
            r = c.request(method.upper(), path, json=body, headers=h)
            assert r.status_code == 401, (path, h, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
    assert store.client("ann")["revoked"] is False  # nothing happened


def test_users_only_predict_admins_manage(make_server):
    make, store, admin, user = make_server
    c = make()
    for method, path, body in ADMIN_ROUTES:
        assert c.request(method.upper(), path, json=body, headers=bearer(user)).status_code == 403, path
    assert c.post("/v1/predict", json={"inputs": [[0.0] * 64]}, headers=bearer(user)).status_code == 200
    r = c.post("/v1/clients", json={"name": "bo", "role": "user", "max_queries": 10}, headers=bearer(admin))
    assert r.status_code == 201 and r.json()["client"]["max_queries"] == 10
    bo = r.json()["api_key"]
    assert c.post("/v1/predict", json={"inputs": [[0.0] * 64]}, headers=bearer(bo)).status_code == 200
    listing = c.get("/v1/clients", headers=bearer(admin)).json()["clients"]
    assert [x["name"] for x in listing] == ["root", "ann", "bo"]
    assert all("key_hash" not in x for x in listing) and bo not in json.dumps(listing)
    assert c.post("/v1/clients", json={"name": "bo"}, headers=bearer(admin)).status_code == 409
    assert c.post("/v1/clients/nobody/revoke", headers=bearer(admin)).status_code == 404
    new = c.post("/v1/clients/bo/rotate", headers=bearer(admin)).json()["api_key"]
    assert c.post("/v1/predict", json={"inputs": [[0.0] * 64]}, headers=bearer(bo)).status_code == 401
    assert c.post("/v1/predict", json={"inputs": [[0.0] * 64]}, headers=bearer(new)).status_code == 200
    assert c.post("/v1/clients/bo/revoke", headers=bearer(admin)).json()["client"]["revoked"] is True
    assert c.post("/v1/predict", json={"inputs": [[0.0] * 64]}, headers=bearer(new)).status_code == 401
    info = c.get("/v1/info", headers=bearer(admin)).json()
    assert info["model"]["backend"] == "pytorch" and info["model"]["model"] == "builtin:digits"
    assert info["model"]["quantized_layers_checked"] == 4


def test_predictions_are_the_model_s(make_server, served):
    make, store, admin, user = make_server
    c = make()
    d = splits()
    x, y = d["test_x"][:64], d["test_y"][:64]
    r = c.post("/v1/predict", json={"inputs": x.tolist()}, headers=bearer(user))
    assert r.status_code == 200
    preds = r.json()["predictions"]
    expected = served.qm(x).argmax(1)
    assert [p["label"] for p in preds] == expected.tolist()
    assert sum(p["label"] == t for p, t in zip(preds, y.tolist())) / len(y) > 0.9
    probs = torch.softmax(served.qm(x), 1)
    for p, row in zip(preds, probs):
        assert len(p["top"]) == 10 and sum(t["score"] for t in p["top"]) == pytest.approx(1.0, abs=1e-5)
        assert p["top"][0]["score"] == pytest.approx(float(row.max()), abs=1e-6)
    flat = c.post("/v1/predict", json={"inputs": x.reshape(64, -1)[:3].tolist()}, headers=bearer(user)).json()
    for a, b in zip(flat["predictions"], preds[:3]):  # [n, 64] means [n, 1, 8, 8]
        assert a["label"] == b["label"] and a["top"][0]["score"] == pytest.approx(b["top"][0]["score"], abs=1e-5)
    for bad in ([[1.0, 2.0]], [], [[[0.0] * 64], [0.0]], "x", [["a"] * 64]):
        assert c.post("/v1/predict", json={"inputs": bad}, headers=bearer(user)).status_code == 422, bad
    assert c.post("/v1/embed", json={"texts": ["a"]}, headers=bearer(user)).status_code == 404


def test_output_hardening_top_k_and_rounding(make_server, served):
    make, store, admin, user = make_server
    c = make(ServerConfig(top_k=2, round_digits=2, integrity_interval=0))
    x = splits()["test_x"][:16]
    preds = c.post("/v1/predict", json={"inputs": x.tolist()}, headers=bearer(user)).json()["predictions"]
    probs = torch.softmax(served.qm(x), 1)
    for p, row in zip(preds, probs):
        assert len(p["top"]) == 2
        top2 = torch.topk(row, 2)
        assert [t["label"] for t in p["top"]] == top2.indices.tolist()
        for t, v in zip(p["top"], top2.values.tolist()):
            assert t["score"] == round(v, 2) and round(t["score"] * 100) == pytest.approx(t["score"] * 100)


def test_batch_and_body_limits(make_server):
    make, store, admin, user = make_server
    c = make(ServerConfig(max_batch=4, max_body_bytes=4000, integrity_interval=0))
    assert c.post("/v1/predict", json={"inputs": [[0.0] * 64] * 5}, headers=bearer(user)).status_code == 413
    big = c.post("/v1/predict", json={"inputs": [[0.123456789] * 64] * 8}, headers=bearer(user))
    assert big.status_code == 413 and "too large" in big.json()["detail"]
    last = store.audit_log(limit=1)[0]
    assert last["status"] == 413 and last["input_sha256"] is None


def test_query_budget_429_with_retry_after(make_server):
    make, store, admin, user = make_server
    store.set_budget("ann", max_queries=5, window_s=3600)
    c = make()
    one = {"inputs": [[0.0] * 64]}
    r = c.post("/v1/predict", json={"inputs": [[0.0] * 64] * 6}, headers=bearer(user))
    assert r.status_code == 413 and "budget is 5" in r.json()["detail"]  # could never fit: no point retrying
    assert c.post("/v1/predict", json={"inputs": [[0.0] * 64] * 3}, headers=bearer(user)).status_code == 200
    r = c.post("/v1/predict", json={"inputs": [[0.0] * 64] * 3}, headers=bearer(user))  # rows count, not requests
    assert r.status_code == 429 and 3590 <= int(r.headers["retry-after"]) <= 3600
    assert c.post("/v1/predict", json={"inputs": [[0.0] * 64] * 2}, headers=bearer(user)).status_code == 200
    r = c.post("/v1/predict", json=one, headers=bearer(user))
    assert r.status_code == 429 and "budget" in r.json()["detail"]
    assert store.client("ann")["queries_total"] == 5
    assert c.post("/v1/predict", json=one, headers=bearer(admin)).status_code == 200  # budgets are per client


def test_rate_limit_429_with_retry_after(make_server):
    make, store, admin, user = make_server
    store.set_budget("ann", rate_per_s=0.5, burst=3)
    c = make()
    assert c.post("/v1/predict", json={"inputs": [[0.0] * 64] * 3}, headers=bearer(user)).status_code == 200
    r = c.post("/v1/predict", json={"inputs": [[0.0] * 64]}, headers=bearer(user))
    assert r.status_code == 429 and r.headers["retry-after"] == "2" and "rate" in r.json()["detail"]
    assert c.post("/v1/predict", json={"inputs": [[0.0] * 64] * 4}, headers=bearer(user)).status_code == 413


def test_every_request_is_audited_with_a_hash_never_the_input(make_server, tmp_path):
    make, store, admin, user = make_server
    store.set_budget("ann", max_queries=1)
    c = make()
    marker = 0.7315926535
    body = json.dumps({"inputs": [[marker] * 64]}).encode()
    sent = [
        c.get("/healthz"),
        c.post("/v1/predict", content=body, headers={"content-type": "application/json"}),
        c.post("/v1/predict", content=body, headers={"content-type": "application/json", **bearer(user)}),
        c.post("/v1/predict", content=body, headers={"content-type": "application/json", **bearer(user)}),
        c.get("/v1/audit", headers=bearer(user)),
        c.get("/nowhere", headers=bearer(user)),
    ]
    assert [r.status_code for r in sent] == [200, 401, 200, 429, 403, 404]
    entries = c.get("/v1/audit", params={"limit": 50}, headers=bearer(admin)).json()["entries"]
    assert [(e["route"], e["status"], e["client"]) for e in entries[::-1][:6]] == [
        ("/healthz", 200, None), ("/v1/predict", 401, None), ("/v1/predict", 200, "ann"),
        ("/v1/predict", 429, "ann"), ("/v1/audit", 403, "ann"), ("/nowhere", 404, "ann")]  # a 404 names its client
    digest = hashlib.sha256(body).hexdigest()
    predicts = [e for e in entries if e["route"] == "/v1/predict"]
    assert [e["input_sha256"] for e in predicts] == [digest] * 3
    assert predicts[0]["rows"] == 1 and predicts[0]["detail"] == "query budget exhausted"
    # the input itself is nowhere in the database
    dump = json.dumps(store.audit_log(limit=1000)) + json.dumps(store.list_clients())
    assert str(marker) not in dump and "0.73159" not in dump
    db_file = store.engine.url.database
    store.engine.dispose()
    raw = b"".join(Path(p).read_bytes() for p in (db_file, db_file + "-wal") if Path(p).exists())
    assert b"0.73159" not in raw and digest.encode() in raw


def test_unauditable_requests_are_refused(make_server, monkeypatch):
    make, store, admin, user = make_server
    c = make()

    def broken(**kw):
        raise RuntimeError("disk full")

    monkeypatch.setattr(store, "audit", broken)
    r = c.post("/v1/predict", json={"inputs": [[0.0] * 64]}, headers=bearer(user))
    assert r.status_code == 503 and "audit" in r.json()["detail"] and "predictions" not in r.text


def _flip_a_weight_bit(model) -> None:
    layer = next(iter(model.guard.layers.values()))
    with torch.no_grad():
        layer.qweight[5] ^= 1 << 6


def test_a_flipped_weight_bit_stops_predictions(make_server, served):
    make, store, admin, user = make_server
    c = make()
    ok = c.post("/v1/predict", json={"inputs": [[0.0] * 64]}, headers=bearer(user))
    assert ok.status_code == 200
    _flip_a_weight_bit(served)
    r = c.post("/v1/integrity/check", headers=bearer(admin)).json()
    assert r["corrupted"] is True and "corrupted weight group" in r["detail"]
    assert c.post("/v1/predict", json={"inputs": [[0.0] * 64]}, headers=bearer(user)).status_code == 503
    assert c.get("/healthz").status_code == 503
    assert c.get("/v1/info", headers=bearer(admin)).json()["model"]["corrupted"] is True
    events = [e for e in store.audit_log() if e["method"] == "EVENT"]
    assert len(events) == 1 and events[0]["route"] == "integrity" and events[0]["status"] == 503
    assert "bytes 0-64" in events[0]["detail"]


def test_the_periodic_check_catches_corruption_while_serving(make_server, served):
    make, store, admin, user = make_server
    c = make(ServerConfig(integrity_interval=0.05))
    assert c.post("/v1/predict", json={"inputs": [[0.0] * 64]}, headers=bearer(user)).status_code == 200
    _flip_a_weight_bit(served)
    deadline = time.monotonic() + 10
    while c.get("/healthz").status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.post("/v1/predict", json={"inputs": [[0.0] * 64]}, headers=bearer(user)).status_code == 503
    assert served.checks >= 2


@pytest.mark.parametrize("where", ["bias", "_w_cache"])
def test_the_checksums_cover_the_float_state_outside_the_codes(served, where):
    """Issue 15: the bias and the dequantized-weight cache the forward reads are checksummed like the codes
    (the canary used to be their only check; it now watches what Python cannot read: tests/server/test_model.py)."""
    assert served.check() is None
    layer = served.qm.module.get_submodule("classifier.3")
    with torch.no_grad():
        if where == "bias":
            layer.bias.add_(0.5)
        else:
            layer._w_cache[0] += 1.0  # one cached row
    assert {c.name for c in served.guard.check()} == {f"classifier.3.{where}"}
    assert "corrupted weight group" in served.check() and f"classifier.3.{where}" in served.corruption


def test_the_server_on_each_database(db_url, served, store_factory):
    """Auth, rotation, budget 429 and the audit log against SQLite and a real PostgreSQL server."""
    store = store_factory(db_url)
    admin, user = store.add_client("root", "admin"), store.add_client("ann", "user", max_queries=2)
    body = {"inputs": [[0.25] * 64]}
    with TestClient(create_app(served, store, ServerConfig(integrity_interval=0))) as c:
        assert [c.post("/v1/predict", json=body, headers=bearer(user)).status_code for _ in range(3)] == [200, 200, 429]
        new = c.post("/v1/clients/ann/rotate", headers=bearer(admin)).json()["api_key"]
        assert c.post("/v1/predict", json=body, headers=bearer(user)).status_code == 401
        c.put("/v1/clients/ann/budget", json={"unlimited": True}, headers=bearer(admin))
        assert c.post("/v1/predict", json=body, headers=bearer(new)).status_code == 200
        entries = c.get("/v1/audit", headers=bearer(admin)).json()["entries"]
    assert [(e["status"], e["client"]) for e in entries[::-1] if e["route"] == "/v1/predict"] == [
        (200, "ann"), (200, "ann"), (429, "ann"), (401, None), (200, "ann")]
    assert store.client("ann")["queries_total"] == 3


def test_failures_inside_are_audited_and_fail_closed(served, store_factory, sqlite_url, monkeypatch):
    store = store_factory(sqlite_url)
    admin = store.add_client("root", "admin")

    def boom(*a, **k):
        raise RuntimeError("kernel exploded")

    with TestClient(create_app(served, store, ServerConfig(integrity_interval=0)), raise_server_exceptions=False) as c:
        monkeypatch.setattr(served, "logits", boom)
        r = c.post("/v1/predict", json={"inputs": [[0.0] * 64]}, headers=bearer(admin))
        assert r.status_code == 500 and "kernel exploded" not in r.text
        row = store.audit_log(limit=1)[0]
        assert (row["status"], row["client"], row["detail"]) == (500, "root", "internal error")
        monkeypatch.setattr(served.guard, "check", boom)  # a check that cannot run takes the model out
        res = c.post("/v1/integrity/check", headers=bearer(admin)).json()
        assert res["corrupted"] is True and "itself failed" in res["detail"]
        assert c.get("/healthz").status_code == 503
