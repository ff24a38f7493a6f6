"""Server database: Alembic migrations, clients and keys, budgets, audit rows (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from secquant.server import ServerDBError, Store, normalize_url
from secquant.server.auth import KeyHasher, Verdict, key_id_of, new_key
from secquant.server.budgets import RateLimiter, TokenBucket, retry_after_header
from secquant.server.db import current_revision, make_engine, migrate


def test_migration_creates_the_schema_on_an_empty_database(db_url):
    eng = make_engine(db_url)
    assert inspect(eng).get_table_names() == []
    migrate(eng)
    assert current_revision(eng) == "0002"
    names = set(inspect(eng).get_table_names())
    assert {"clients", "audit_log", "alembic_version"} <= names
    cols = {c["name"] for c in inspect(eng).get_columns("audit_log")}
    assert {"client_id", "ts", "route", "status", "input_sha256"} <= cols
    assert not {"body", "input", "inputs"} & cols  # there is nowhere to store an input
    migrate(eng)  # idempotent
    from alembic import command

    from secquant.server.db import alembic_config

    cfg = alembic_config(eng)
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.downgrade(cfg, "base")
    assert set(inspect(eng).get_table_names()) <= {"alembic_version"}
    migrate(eng)
    assert current_revision(eng) == "0002"
    eng.dispose()


def test_clients_keys_rotation_revocation(db_url, store_factory):
    s = store_factory(db_url)
    key = s.add_client("alice", "user")
    assert key.startswith("sq_") and key_id_of(key) is not None
    p = s.authenticate(key)
    assert (p.name, p.role) == ("alice", "user")
    assert s.authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert s.authenticate("") is None and s.authenticate("sq_nothex_x") is None
    with s.engine.connect() as c:  # only a hash is stored
        row = c.execute(text("SELECT key_id, key_hash FROM clients WHERE name = 'alice'")).one()
    assert row.key_hash.startswith(f"hmac-sha256${s.hasher.secret_id}$") and len(row.key_hash.split("$")[2]) == 64
    assert key not in row.key_hash and key.split("_")[2] not in row.key_hash and row.key_id == key_id_of(key)
    new = s.rotate_key("alice")
    assert new != key and s.authenticate(key) is None and s.authenticate(new).name == "alice"
    s.revoke("alice")
    assert s.authenticate(new) is None
    assert s.list_clients()[0]["revoked"] is True and "key_hash" not in s.list_clients()[0]
    again = s.rotate_key("alice")  # a new key re-enables the client
    assert s.authenticate(again).name == "alice"
    with pytest.raises(ServerDBError, match="already exists"):
        s.add_client("alice")
    with pytest.raises(ServerDBError, match="role"):
        s.add_client("bob", "root")
    with pytest.raises(ServerDBError, match="no client named"):
        s.revoke("nobody")


def test_revocation_is_seen_by_another_server_process(db_url, store_factory):
    a, b = store_factory(db_url), store_factory(db_url)  # two servers on one database
    key = a.add_client("carol")
    assert b.authenticate(key).name == "carol"  # now cached in b
    a.revoke("carol")
    assert b.authenticate(key) is None


def test_budget_window_is_counted_in_rows_and_resets(db_url, store_factory):
    s = store_factory(db_url)
    s.add_client("dave", max_queries=5, window_s=100)
    cid = s.list_clients()[0]
    pid = s.authenticate(s.rotate_key("dave")).id
    t0 = 1_000_000.0
    assert s.consume(pid, 3, now=t0) == 0.0
    assert s.consume(pid, 3, now=t0 + 10) == pytest.approx(90.0)  # 3 + 3 > 5: refused, nothing counted
    assert s.consume(pid, 2, now=t0 + 10) == 0.0
    assert s.consume(pid, 1, now=t0 + 20) == pytest.approx(80.0)
    assert s.consume(pid, 5, now=t0 + 100) == 0.0  # a new window
    assert s.consume(pid, 6, now=t0 + 300) == float("inf")  # can never fit
    c = s.client("dave")
    assert c["queries_total"] == 10 and c["window_used"] == 0 and cid["max_queries"] == 5  # t0 + 300 opened a window
    s.set_budget("dave", unlimited=True)
    assert s.consume(pid, 1000, now=t0 + 310) == 0.0


def test_audit_rows_round_trip(db_url, store_factory):
    s = store_factory(db_url)
    s.audit(method="POST", route="/v1/predict", status=429, client_id=7, client_name="eve", input_sha256="ab" * 32,
            rows=4, latency_ms=1.5, detail="rate limit")
    s.audit(method="GET", route="/healthz", status=200)
    log = s.audit_log()
    assert [e["status"] for e in log] == [200, 429]  # newest first
    assert log[1]["client"] == "eve" and log[1]["rows"] == 4 and log[1]["input_sha256"] == "ab" * 32
    assert log[1]["ts"].endswith("+00:00")
    assert [e["route"] for e in s.audit_log(client="eve")] == ["/v1/predict"]
    assert s.audit_log(status=200)[0]["route"] == "/healthz"


def test_keys_are_an_hmac_under_the_server_secret_compared_in_constant_time(monkeypatch):
    import hmac as hmac_module

    import secquant.server.auth as auth

    h, other = KeyHasher(b"k" * 32), KeyHasher(b"j" * 32)
    _, key = new_key()
    stored = h.hash(key)
    scheme, sid, mac = stored.split("$")
    assert (scheme, sid) == ("hmac-sha256", h.secret_id) and sid != other.secret_id
    assert mac == hmac_module.new(b"k" * 32, key.encode(), "sha256").hexdigest()
    compared, real = [], hmac_module.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append((a, b)) or real(a, b))
    assert h.verify(key, stored) is Verdict.OK and compared == [(mac, mac)]
    assert h.verify(key[:-1] + ("A" if key[-1] != "A" else "B"), stored) is Verdict.BAD
    assert other.verify(key, stored) is Verdict.BAD and other.other_secret(stored) and not h.other_secret(stored)
    assert h.verify(key, None) is Verdict.BAD  # no live client holds the id
    assert h.verify(key, "sha1$" + mac) is Verdict.BAD  # an unknown record format fails closed
    with pytest.raises(ValueError):
        KeyHasher(b"short")


def test_token_bucket_with_a_fake_clock():
    now = [0.0]
    b = TokenBucket(rate=2.0, burst=4, clock=lambda: now[0])
    assert b.take(3) == 0.0 and b.take(1) == 0.0
    assert b.take(1) == pytest.approx(0.5)  # empty: one token in half a second
    now[0] = 1.0
    assert b.take(2) == 0.0
    assert b.take(5) > 0  # more than the burst waits (the app refuses such batches with 413)
    lim = RateLimiter(clock=lambda: now[0])
    assert lim.take(1, None, None, 10_000) == 0.0
    assert lim.take(1, 1.0, 2, 2) == 0.0 and lim.take(1, 1.0, 2, 1) == pytest.approx(1.0)
    assert lim.take(2, 1.0, 2, 2) == 0.0  # buckets are per client
    assert retry_after_header(0.2) == "1" and retry_after_header(90.01) == "91"


def test_db_urls():
    assert normalize_url("postgresql://u:p@h:5/d").startswith("postgresql+psycopg://u:p@h:5/d")
    assert normalize_url("x/server.db") == "sqlite:///x/server.db"
    with pytest.raises(ServerDBError, match="only SQLite and PostgreSQL"):
        normalize_url("mysql://u@h/d")


def test_unreachable_database_is_a_user_error(tmp_path):
    with pytest.raises(ServerDBError, match="cannot open or migrate"):
        Store("postgresql://nobody:wrong@127.0.0.1:1/none", secret_file=tmp_path / "pg.secret")
    assert not (tmp_path / "pg.secret").exists()  # nothing made for a database that cannot be opened
    with pytest.raises(ServerDBError, match="cannot open or migrate"):
        Store(tmp_path / "missing-dir" / "server.db")


def test_the_migrations_match_the_models(db_url):
    """Alembic's autogenerate sees no difference between the migrated schema and the ORM models."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from secquant.server.db import Base

    eng = make_engine(db_url)
    migrate(eng)
    with eng.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    eng.dispose()
    assert diff == []


def test_migration_0002_keeps_existing_names_even_confusable_ones(db_url, tmp_path):
    """Names made before the name rule (look-alikes, characters outside today's set) stay usable;
    a new name confusable with any of them is refused."""
    from secquant.server.names import skeleton

    eng = make_engine(db_url)
    migrate(eng, "0001")
    with eng.begin() as c:
        for i, name in enumerate(["ann", "Ann", "caf\u00e9 bar"]):
            c.execute(text("INSERT INTO clients (name, role, key_id, key_hash, created_at, window_s, window_used, "
                           "queries_total) VALUES (:n, 'user', :k, 'x', CURRENT_TIMESTAMP, 86400, 0, 0)"),
                      {"n": name, "k": f"{i:012x}"})
    eng.dispose()
    s = Store(db_url, secret_file=tmp_path / "s.secret")
    with s.engine.connect() as c:
        rows = c.execute(text("SELECT name, name_skeleton FROM clients ORDER BY id")).all()
    assert [r[0] for r in rows] == ["ann", "Ann", "caf\u00e9 bar"]
    assert rows[0][1] == skeleton("ann") and rows[1][1].startswith(skeleton("ann") + "#")
    for lookalike in ("ANN", "aNn"):
        with pytest.raises(ServerDBError, match="confusable"):
            s.add_client(lookalike)
    s.rotate_key("Ann")  # both old clients are still managed by name
    s.set_budget("caf\u00e9 bar", max_queries=3)
    s.close()
