"""Issue 13 item 5: a bad API key must cost the server next to nothing.

Before: every bad key ran argon2id (64 MiB, t=3) before any limit, so 32 concurrent bogus-key
requests took the server from 516 MiB to 2.26 GB. Now keys are an HMAC under a server secret:
bogus keys (unknown id, malformed, revoked, wrong secret) never reach argon2; only a record made
by an older version is checked with argon2id, at most two at once, and replaced by an HMAC on its
first success; and an address that sent too many bad keys is refused (429) before its next key is
looked at. The latency bar (a valid client within 2x of idle under 64 concurrent bogus keys) is
measured by bench/server_load.py --bogus 64, not here.
"""

from __future__ import annotations

import threading
import time

import pytest
from argon2 import PasswordHasher
from fastapi.testclient import TestClient
from sqlalchemy import text

import secquant
from secquant.server import ServedModel, ServerConfig, Store, create_app
from secquant.server.auth import LEGACY_FAILURES_PER_MINUTE, LEGACY_SLOTS, new_key
from secquant.server.budgets import FailureLimiter
from secquant.server.db import make_engine, migrate

ONE = {"inputs": [[0.0] * 64]}


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def served(digits_artifact):
    return ServedModel(secquant.load(digits_artifact("w8a16"), allow_unsealed=True))


@pytest.fixture
def argon2_calls(monkeypatch):
    """Every argon2 verification in the process, counted (the real one still runs)."""
    calls = []
    real = PasswordHasher.verify

    def spy(self, hash, password):
        calls.append(hash)
        return real(self, hash, password)

    monkeypatch.setattr(PasswordHasher, "verify", spy)
    return calls


def _old_client(url: str, name: str, role: str = "user") -> str:
    """A client row exactly as secquant <= 0.1 wrote it: schema revision 0001, argon2id (argon2-cffi's
    defaults, 64 MiB, t=3) of the whole key. Returns the key."""
    eng = make_engine(url)
    migrate(eng, "0001")
    key_id, key = new_key()
    with eng.begin() as c:
        c.execute(text("INSERT INTO clients (name, role, key_id, key_hash, created_at, window_s, window_used, "
                       "queries_total) VALUES (:n, :r, :k, :h, CURRENT_TIMESTAMP, 86400, 0, 0)"),
                  {"n": name, "r": role, "k": key_id, "h": PasswordHasher().hash(key)})
    eng.dispose()
    return key


def test_bogus_keys_never_reach_argon2(tmp_path, argon2_calls):
    url = f"sqlite:///{tmp_path / 's.db'}"
    legacy = _old_client(url, "old")
    s = Store(url)
    key = s.add_client("ann")
    gone = s.add_client("gone")
    s.revoke("gone")
    rotated = s.add_client("rot")
    s.rotate_key("rot")
    legacy_id = legacy.split("_")[1]
    bogus = [new_key()[1] for _ in range(50)]  # well-formed, unknown ids
    bogus += ["", "garbage", "sq_zz_" + "A" * 43, "x" * 5000, gone, rotated,
              key[:-1] + ("A" if key[-1] != "A" else "B"),  # right id, wrong secret, HMAC record
              "sq_" + key.split("_")[1] + "_" + "B" * 43]
    assert all(s.authenticate(k) is None for k in bogus)
    assert argon2_calls == []
    assert s.authenticate(key).name == "ann" and argon2_calls == []
    # The one way left to argon2: a wrong secret under the id of a not yet migrated old record
    # (bounded by the per-address limit in the app and by LEGACY_SLOTS, tested below).
    assert s.authenticate(f"sq_{legacy_id}_" + "C" * 43) is None and len(argon2_calls) == 1
    s.close()


def test_a_record_made_the_old_way_still_works_and_is_migrated_on_first_use(tmp_path, argon2_calls):
    url = f"sqlite:///{tmp_path / 's.db'}"
    key = _old_client(url, "veteran", "admin")
    s = Store(url)  # migrates 0001 -> 0002
    assert s.key_record_counts() == {"hmac": 0, "legacy": 1, "other_secret": 0}
    p = s.authenticate(key)
    assert (p.name, p.role) == ("veteran", "admin") and len(argon2_calls) == 1
    with s.engine.connect() as c:
        stored = c.execute(text("SELECT key_hash FROM clients WHERE name = 'veteran'")).scalar()
    assert stored == s.hasher.hash(key)  # replaced by the HMAC record
    assert s.key_record_counts() == {"hmac": 1, "legacy": 0, "other_secret": 0}
    assert s.authenticate(key).name == "veteran" and len(argon2_calls) == 1  # no argon2 any more
    s.close()
    s2 = Store(url)  # and after a restart
    assert s2.authenticate(key).name == "veteran" and len(argon2_calls) == 1
    s2.close()


def test_a_rotation_racing_the_migration_wins(tmp_path, monkeypatch):
    """The rehash is compare-and-set: a key rotated while its old record was being verified stays rotated."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    key = _old_client(url, "veteran")
    s = Store(url)
    real = PasswordHasher.verify
    box = {}

    def verify_then_rotate(self, hash, password):
        ok = real(self, hash, password)
        box["new"] = s.rotate_key("veteran")  # lands between the check and the rehash
        return ok

    monkeypatch.setattr(PasswordHasher, "verify", verify_then_rotate)
    s.authenticate(key)
    monkeypatch.setattr(PasswordHasher, "verify", real)
    assert s.authenticate(key) is None and s.authenticate(box["new"]).name == "veteran"
    s.close()


def test_old_records_are_checked_at_most_two_at_a_time(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 's.db'}"
    legacy = _old_client(url, "old")
    s = Store(url)
    now = [0]
    peak = [0]
    lock = threading.Lock()

    def slow(self, hash, password):  # stands in for a 64 MiB argon2id run
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        time.sleep(0.1)
        with lock:
            now[0] -= 1
        return False

    monkeypatch.setattr(PasswordHasher, "verify", slow)
    wrong = f"sq_{legacy.split('_')[1]}_" + "D" * 43
    ts = [threading.Thread(target=s.authenticate, args=(wrong,)) for _ in range(8)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert peak[0] == LEGACY_SLOTS == 2
    s.close()


def test_failed_checks_against_one_old_record_are_capped_per_key_id(tmp_path, monkeypatch, argon2_calls):
    """Many addresses guessing under one known key id of an old record cannot keep argon2 busy."""
    monkeypatch.setattr(PasswordHasher, "verify", lambda self, h, k: argon2_calls.append(h) or False)
    url = f"sqlite:///{tmp_path / 's.db'}"
    legacy = _old_client(url, "old")
    s = Store(url)
    kid = legacy.split("_")[1]
    for i in range(40):
        assert s.authenticate(f"sq_{kid}_" + f"{i:02d}" + "E" * 41) is None
    assert len(argon2_calls) == LEGACY_FAILURES_PER_MINUTE == 10
    s.close()


def test_an_address_with_too_many_bad_keys_gets_429_before_any_key_check(served, tmp_path, monkeypatch):
    s = Store(f"sqlite:///{tmp_path / 's.db'}")
    user = s.add_client("ann")
    checked = []
    real = s.authenticate
    monkeypatch.setattr(s, "authenticate", lambda key: checked.append(key) or real(key))
    cfg = ServerConfig(integrity_interval=0, auth_failures_per_minute=5, auth_refusal_delay_s=0.2)
    app = create_app(served, s, cfg)
    with TestClient(app, client=("203.0.113.7", 4000)) as attacker, \
            TestClient(app, client=("198.51.100.9", 4000)) as honest:
        codes = [attacker.post("/v1/predict", json=ONE, headers=bearer(new_key()[1])).status_code for _ in range(5)]
        assert codes == [401] * 5 and len(checked) == 5
        t0 = time.monotonic()
        r = attacker.post("/v1/predict", json=ONE, headers=bearer(new_key()[1]))
        assert r.status_code == 429 and 1 <= int(r.headers["retry-after"]) <= 12
        assert time.monotonic() - t0 >= 0.2  # a refused address is answered slowly
        assert "failed authentications" in r.json()["detail"]
        # refused before the key is looked at: even a valid key, even on a malformed body
        assert attacker.post("/v1/predict", json=ONE, headers=bearer(user)).status_code == 429
        assert attacker.post("/v1/predict", content=b"{not json", headers=bearer(user)).status_code == 429
        assert attacker.get("/v1/nothing-here", headers=bearer(new_key()[1])).status_code == 404
        assert len(checked) == 5
        # another address is not affected
        assert honest.post("/v1/predict", json=ONE, headers=bearer(user)).status_code == 200
        assert honest.post("/v1/predict", json=ONE, headers=bearer(new_key()[1])).status_code == 401
    rows = [r for r in s.audit_log(limit=100) if r["status"] == 429]
    assert len(rows) == 3 and {r["remote_addr"] for r in rows} == {"203.0.113.7"}
    assert all(r["detail"] == "too many failed authentications from this address" for r in rows)
    s.close()


def test_the_failure_limit_refills_and_groups_ipv6_by_64():
    now = [0.0]
    lim = FailureLimiter(per_minute=3, clock=lambda: now[0], max_tracked=4)
    for _ in range(3):
        assert lim.retry_after("2001:db8:1:2::5") == 0.0
        lim.failed("2001:db8:1:2::5")
    assert lim.retry_after("2001:db8:1:2:ffff::9") == pytest.approx(20.0)  # same /64: same bucket
    assert lim.retry_after("2001:db8:1:3::5") == 0.0  # another /64
    assert lim.retry_after("::ffff:192.0.2.1") == lim.retry_after("192.0.2.1") == 0.0
    now[0] = 20.0
    assert lim.retry_after("2001:db8:1:2::5") == 0.0  # one failure refilled per 60/3 s
    for i in range(10):  # the table is bounded: least recently failed addresses are forgotten
        lim.failed(f"192.0.2.{i}")
    assert len(lim._buckets) == 4
