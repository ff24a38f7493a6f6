"""Issue 13 item 6: terminal escape injection through the audit log.

An unauthenticated request to a path holding ANSI escape codes was stored raw and replayed by
`secquant server audit-log`, where it could clear the admin's screen, rewrite earlier rows or set
the window title. Now control characters and escape sequences are removed before a row is stored
(store.audit) and again before a table is printed (rows written by older versions).
"""

from __future__ import annotations

import json
import unicodedata

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import text

import secquant
from secquant.server import ServedModel, ServerConfig, Store, create_app
from secquant.server.safetext import clean

HOSTILE = "\x1b[2J\x1b[H\x1b]0;owned\x07\x1b[31mok\x1b[0m\x9b1A\u202egol\u2028\r\n\x00\x7f"
BIDI = {"\u061c", "\u200e", "\u200f", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))}


def unsafe(s: str) -> list[str]:
    """Characters a terminal would act on, or that hide / reorder text."""
    return [c for c in s if unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") or c in BIDI]


def terminal_unsafe(output: str) -> list[str]:
    return [c for c in unsafe(output) if c != "\n"]  # the table's own line breaks


@pytest.fixture(scope="module")
def served(digits_artifact):
    return ServedModel(secquant.load(digits_artifact("w8a16"), allow_unsealed=True))


def _all_text(store: Store) -> str:
    with store.engine.connect() as c:
        rows = c.execute(text("SELECT method, route, client_name, detail, remote_addr FROM audit_log")).all()
    return json.dumps([list(r) for r in rows], ensure_ascii=False)


def test_hostile_paths_headers_and_peers_are_stored_clean(served, tmp_path, cli):
    db = tmp_path / "s.db"
    store = Store(db)
    user = store.add_client("ann")
    app = create_app(served, store, ServerConfig(integrity_interval=0))
    paths = ["/v1/%1B%5B2J%1B%5BH%1B%5D0%3Bowned%07/x",  # clear screen, home, window title
             "/%C2%9B1A%C2%9B2K/fake-row",  # 8-bit CSI: cursor up, erase line
             "/v1/%E2%80%AEtciderp%E2%80%AC",  # right-to-left override
             "/v1/predict%0A2026-01-01 200 admin /v1/clients%0D"]  # a forged second line
    with TestClient(app, client=("203.0.113.5", 1)) as c, \
            TestClient(app, client=(HOSTILE, 2)) as proxied:  # e.g. a forwarded-for value a proxy passed on
        for p in paths:
            assert c.get(p).status_code == 404
            assert c.post(p, headers={"Authorization": f"Bearer {user}"}).status_code in (404, 405)
        hostile_headers = {"User-Agent": "\x1b[2Jevil", "X-Forwarded-For": "\x1b]0;t\x07", "Authorization":
                           "Bearer \x1b[31msq_x"}
        assert c.post("/v1/predict", json={"inputs": [[0.0] * 64]}, headers=hostile_headers).status_code == 401
        assert proxied.get("/healthz").status_code == 200
    stored = _all_text(store)
    assert unsafe(stored) == [], unsafe(stored)
    assert "fake-row" in stored and "tciderp" in stored and "\ufffd" in stored  # kept, with a visible mark
    assert "owned" not in stored  # an OSC string (window title) goes whole
    rows = store.audit_log(limit=100)
    assert len(rows) == 2 * len(paths) + 2 and all(len(r["route"]) <= 200 for r in rows)
    store.close()
    table = cli("server", "audit-log", "--db", db)
    assert table.exit_code == 0 and "fake-row" in table.stdout
    assert terminal_unsafe(table.stdout) == []
    lines = cli("server", "audit-log", "--json", "--db", db).stdout
    assert lines.isascii() and terminal_unsafe(lines) == []  # JSON writes anything else as \u escapes


def test_rows_an_older_version_stored_raw_are_cleaned_when_printed(tmp_path, cli):
    db = tmp_path / "s.db"
    store = Store(db)
    with store.engine.begin() as c:  # bypass store.audit: what secquant <= 0.1 wrote
        c.execute(text("INSERT INTO audit_log (ts, method, route, status, client_name, detail) VALUES "
                       "(CURRENT_TIMESTAMP, 'GET', :r, 404, :n, :d)"),
                  {"r": "/x" + HOSTILE, "n": "ann" + HOSTILE, "d": HOSTILE})
        c.execute(text("INSERT INTO clients (name, name_skeleton, role, key_id, key_hash, created_at, window_s, "
                       "window_used, queries_total) VALUES (:n, 'legacy', 'user', 'abcdefabcdef', 'x', "
                       "CURRENT_TIMESTAMP, 86400, 0, 0)"), {"n": "old" + HOSTILE})
    store.close()
    for args in (("server", "audit-log"), ("server", "list-clients")):
        r = cli(*args, "--db", db)
        assert r.exit_code == 0 and "ok" in r.stdout and ("ann" in r.stdout or "old" in r.stdout)
        assert terminal_unsafe(r.stdout) == [], (args, terminal_unsafe(r.stdout))


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(alphabet=st.one_of(st.characters(codec="utf-8"), st.sampled_from(list(HOSTILE) + ["\x1b", "["])),
               max_size=60))
def test_clean_leaves_nothing_a_terminal_acts_on(s):
    out = clean(s)
    assert unsafe(out) == [] and "\x1b" not in out
    assert clean(out) == out  # idempotent
    if s.isprintable():
        assert out == s  # ordinary text is untouched
