"""Issue 13 item 10, the server's part: private database and secret files, capped error messages,
client names that cannot impersonate each other, 404 rows that name their client, HEAD /healthz,
the OpenAPI document for admins only, and every route documented in the README."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from sqlalchemy.exc import IntegrityError

import secquant
from secquant.server import ServedModel, ServerConfig, ServerDBError, Store, create_app
from secquant.server.db import ClientNotFound
from secquant.server.names import ClientNameError, normalize_name, skeleton
from secquant.server.secret import ServerSecretError

README = Path(__file__).resolve().parents[3] / "README.md"
ONE = {"inputs": [[0.0] * 64]}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(scope="module")
def served(digits_artifact):
    return ServedModel(secquant.load(digits_artifact("w8a16"), allow_unsealed=True))


@pytest.fixture
def server(served, tmp_path):
    store = Store(tmp_path / "s.db")
    admin, user = store.add_client("root", "admin"), store.add_client("ann")
    with TestClient(create_app(served, store, ServerConfig(integrity_interval=0))) as c:
        yield c, store, admin, user
    store.close()


# ---- files -------------------------------------------------------------------------------------------

def test_the_database_and_its_secret_are_created_0600_whatever_the_umask(tmp_path):
    old = os.umask(0)  # the most permissive umask: anything not explicit comes out world-writable
    try:
        store = Store(tmp_path / "s.db")
        key = store.add_client("ann")
        store.audit(method="GET", route="/x", status=404)
        files = {p.name: mode(p) for p in tmp_path.iterdir()}
        assert files == {"s.db": 0o600, "s.db-wal": 0o600, "s.db-shm": 0o600, "s.db.secret": 0o600}, files
        store.close()
    finally:
        os.umask(old)
    assert Store(tmp_path / "s.db").authenticate(key).name == "ann"  # the secret survives a restart


def test_a_secret_file_others_can_read_or_a_malformed_one_is_refused(tmp_path, cli, assert_user_error):
    Store(tmp_path / "s.db").close()
    secret = tmp_path / "s.db.secret"
    secret.chmod(0o640)
    with pytest.raises(ServerSecretError, match="chmod 600"):
        Store(tmp_path / "s.db")
    assert_user_error(cli("server", "list-clients", "--db", tmp_path / "s.db"), contains=("chmod 600",))
    secret.chmod(0o600)
    secret.write_text("not hex\n")
    with pytest.raises(ServerSecretError, match="not 32 bytes"):
        Store(tmp_path / "s.db")
    with pytest.raises(ServerDBError, match="--secret-file"):  # PostgreSQL: refused before connecting
        Store("postgresql://u:p@127.0.0.1:1/x")
    assert_user_error(cli("server", "list-clients", "--db", "postgresql://u:p@127.0.0.1:1/x"),
                      contains=("--secret-file",))


def test_a_lost_secret_fails_closed_and_is_reported(tmp_path):
    s = Store(tmp_path / "s.db")
    key = s.add_client("ann")
    s.close()
    (tmp_path / "s.db.secret").unlink()
    s = Store(tmp_path / "s.db")  # a new secret: the old records cannot be checked any more
    assert s.authenticate(key) is None
    assert s.key_record_counts() == {"hmac": 0, "legacy": 0, "other_secret": 1}
    assert s.authenticate(s.rotate_key("ann")).name == "ann"
    s.close()


# ---- error messages ----------------------------------------------------------------------------------

def test_error_messages_are_capped_and_never_echo_a_large_input(server, monkeypatch):
    c, store, admin, user = server

    def long_error(name):  # whatever a message grows to (a name, an exception's text), the reply is capped
        raise ClientNotFound(f"no client named {name!r}: see `secquant server list-clients`")

    monkeypatch.setattr(store, "revoke", long_error)
    long_name = "a" * 3000
    replies = [
        c.post(f"/v1/clients/{long_name}/rotate", headers=bearer(admin)),  # 404 naming the client
        c.post(f"/v1/clients/{long_name}/revoke", headers=bearer(admin)),
        c.post("/v1/clients", json={"name": "x" * 5000}, headers=bearer(admin)),  # 422 from the name rule
        c.post("/v1/clients", json={"name": "bo", "y" * 10000: 1}, headers=bearer(admin)),  # unknown field
        c.post("/v1/clients", json={f"f{i}": i for i in range(500)}, headers=bearer(admin)),  # 501 errors
        c.post("/v1/predict", json={"inputs": [[0.0] * 64], **{"z" * 999: 1}}, headers=bearer(user)),
    ]
    assert [r.status_code for r in replies] == [404, 404, 422, 422, 422, 422]
    for r in replies:
        assert len(r.text) < 800, (r.status_code, len(r.text))
        d = r.json()["detail"]
        if isinstance(d, str):
            assert len(d) <= 300
        else:
            assert 1 <= len(d) <= 3 and all(len(e["msg"]) <= 150 for e in d)
    assert "yyyyyyyyyy" * 5 not in replies[2].text


# ---- client names -------------------------------------------------------------------------------------

def test_client_names_have_one_character_set_and_are_nfkc_normalized(tmp_path):
    s = Store(tmp_path / "s.db")
    for bad in ["", "a" * 65, "-ann", "ann.", "an n", "ann\x1b[2J", "ann\u202e", "\u0430nn",  # Cyrillic a
                "ann\u200b", "root/../x", "ann\n", "caf\u00e9"]:
        with pytest.raises(ClientNameError, match="1-64 characters"):
            s.add_client(bad)
    s.add_client("\uff41\uff4c\uff49\uff43\uff45")  # full-width "alice"
    assert [c["name"] for c in s.list_clients()] == ["alice"]
    assert normalize_name("svc-1.prod_eu@team") == "svc-1.prod_eu@team"
    s.close()


@pytest.mark.parametrize("existing, lookalike", [("ann", "Ann"), ("ann", "ANN"), ("paypal", "paypa1"),
                                                  ("admin", "adm1n"), ("admin", "admln"), ("mike", "rnike"),
                                                  ("wolf", "vvolf"), ("dave", "clave"), ("bob", "b0b"),
                                                  ("billing", "bi11ing"), ("ann", "\uff21nn")])
def test_names_confusable_with_an_existing_client_are_refused(tmp_path, existing, lookalike):
    s = Store(f"sqlite:///{tmp_path / 's.db'}")
    s.add_client(existing)
    with pytest.raises(ServerDBError, match="confusable with the existing client"):
        s.add_client(lookalike, "admin")
    assert [c["name"] for c in s.list_clients()] == [existing]
    s.close()


def test_the_database_itself_refuses_confusable_names(tmp_path, monkeypatch):
    """Two admins adding look-alike names at once: the unique skeleton column decides."""
    s = Store(tmp_path / "s.db")
    s.add_client("paypal")
    monkeypatch.setattr(Store, "_refuse_taken", staticmethod(lambda session, name: None))  # lose the pre-check
    with pytest.raises(IntegrityError):
        s.add_client("PAYPA1")
    assert skeleton("PAYPA1") == skeleton("paypal") and len(s.list_clients()) == 1
    s.close()


def test_confusable_names_over_http_and_the_cli(server, cli, assert_user_error):
    c, store, admin, user = server
    r = c.post("/v1/clients", json={"name": "r00t", "role": "admin"}, headers=bearer(admin))
    assert r.status_code == 409 and "confusable" in r.json()["detail"] and "api_key" not in r.text
    r = c.post("/v1/clients", json={"name": "ro\u043et"}, headers=bearer(admin))  # Cyrillic o
    assert r.status_code == 422 and "1-64 characters" in r.json()["detail"]
    db = store.engine.url.database
    assert_user_error(cli("server", "add-client", "R0OT", "--db", db), contains=("confusable",))
    assert [x["name"] for x in store.list_clients()] == ["root", "ann"]


# ---- 404 rows, HEAD /healthz, the OpenAPI document ------------------------------------------------------

def test_404_and_405_rows_name_the_client_when_a_valid_key_was_sent(server):
    c, store, admin, user = server
    assert c.get("/v1/secret-admin-page", headers=bearer(user)).status_code == 404
    assert c.get("/v1/secret-admin-page", headers=bearer(user[:-1] + "x")).status_code == 404
    assert c.get("/v1/secret-admin-page").status_code == 404
    assert c.get("/v1/predict", headers=bearer(user)).status_code == 405
    rows = store.audit_log(limit=4)[::-1]
    assert [(r["status"], r["client"]) for r in rows] == [(404, "ann"), (404, None), (404, None), (405, "ann")]
    assert all(r["remote_addr"] == "testclient" for r in rows)


def test_head_healthz_answers_like_get_without_a_body(server, served):
    c, store, admin, user = server
    r = c.head("/healthz")
    assert r.status_code == 200 and r.content == b"" and r.headers["content-type"] == "application/json"
    served.corruption = "test: out of service"
    try:
        assert c.head("/healthz").status_code == 503 and c.get("/healthz").status_code == 503
    finally:
        served.corruption = None


def test_the_openapi_document_is_for_admins_only(server):
    c, store, admin, user = server
    assert c.get("/openapi.json").status_code == 401
    assert c.get("/openapi.json", headers=bearer(user)).status_code == 403
    doc = c.get("/openapi.json", headers=bearer(admin)).json()
    assert {"/healthz", "/v1/predict", "/v1/embed", "/v1/audit"} <= set(doc["paths"])
    assert doc["paths"]["/v1/predict"]["post"]["security"] == [{"HTTPBearer": []}]
    for page in ("/docs", "/redoc", "/docs/oauth2-redirect"):
        assert c.get(page, headers=bearer(admin)).status_code == 404


def test_the_readme_documents_every_route_with_a_curl_example(server):
    c = server[0]
    section = README.read_text().split("## The server", 1)[1].split("\n## ", 1)[0]
    assert "Authorization: Bearer" in section
    curls = [ln for ln in section.splitlines() if ln.lstrip().startswith("curl ")]
    for route in c.app.routes:
        if not isinstance(route, APIRoute):
            continue
        pattern = re.escape(route.path).replace(r"\{name\}", r"[A-Za-z0-9._@-]+")
        for method in route.methods:
            flag = {"GET": "", "HEAD": "-I", "POST": "-X POST", "PUT": "-X PUT"}[method]
            hits = [ln for ln in curls if re.search(pattern + r"(?:\?|\"|'|\s|$)", ln) and flag in ln
                    and (method != "GET" or "-X " not in ln and "-I" not in ln)]
            assert hits, f"no curl example for {method} {route.path} in the README's server section"


def test_an_existing_database_open_to_others_is_reported(tmp_path, caplog):
    Store(tmp_path / "s.db").close()
    (tmp_path / "s.db").chmod(0o644)
    with caplog.at_level("WARNING", logger="secquant.server"):
        Store(tmp_path / "s.db").close()
    assert any("open to other users" in r.getMessage() and "chmod 600" in r.getMessage() for r in caplog.records)
