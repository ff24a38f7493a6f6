"""Client management, authentication, query budgets and the audit log, on one database."""

from __future__ import annotations

import datetime as dt
import os
import secrets
import time
import unicodedata
from dataclasses import dataclass

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .auth import KeyHasher, Verdict, is_legacy, key_id_of, new_key
from .db import (ROLES, AuditEntry, Client, ClientExists, ClientNotFound, ServerDBError, make_engine, migrate,
                 sqlite_path, utcnow)
from .names import normalize_name, skeleton
from .safetext import clean
from .secret import ENV as SECRET_ENV
from .secret import default_secret_path, load_or_create_secret


@dataclass(frozen=True)
class Principal:
    """An authenticated client, as the request handlers see it."""

    id: int
    name: str
    role: str
    max_queries: int | None
    window_s: int
    rate_per_s: float | None
    burst: int | None


class Store:
    """The server database; `migrate_schema=True` (the default) creates or upgrades the schema first.

    `secret_file` holds the server secret that keys are hashed under (see secret.py); by default
    `$SECQUANT_SERVER_SECRET_FILE`, else `DB.secret` next to a SQLite file. An in-memory database
    gets a secret that lives as long as the process (as the database does).
    """

    def __init__(self, db: str | os.PathLike, *, migrate_schema: bool = True,
                 secret_file: str | os.PathLike | None = None) -> None:
        self.engine = make_engine(db)
        try:
            secret_path = self._secret_path(secret_file)  # a PostgreSQL URL without one fails before connecting
            if migrate_schema:
                migrate(self.engine)
            # an in-memory database gets a secret that dies with the process, as the database does
            self.hasher = KeyHasher(load_or_create_secret(secret_path) if secret_path else secrets.token_bytes(32))
        except BaseException:
            self.engine.dispose()
            raise
        self.session: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)

    def _secret_path(self, secret_file: str | os.PathLike | None):
        secret_file = secret_file or os.environ.get(SECRET_ENV) or None
        if secret_file is not None:
            return secret_file
        if self.engine.url.drivername.startswith("sqlite"):
            return default_secret_path(sqlite_path(self.engine))
        raise ServerDBError(f"a PostgreSQL server database needs --secret-file PATH (or ${SECRET_ENV}): the file "
                            "holding the secret API keys are hashed under, created 0600 if missing; every server "
                            "on this database must use the same file")

    def close(self) -> None:
        self.engine.dispose()

    # -- clients ---------------------------------------------------------------------------------

    def _get(self, s: Session, name: str) -> Client:
        c = s.scalar(select(Client).where(Client.name == name))
        if c is None:
            c = s.scalar(select(Client).where(Client.name == unicodedata.normalize("NFKC", name)))
        if c is None:
            raise ClientNotFound(f"no client named {name[:80]!r}: see `secquant server list-clients`")
        return c

    def add_client(self, name: str, role: str = "user", *, max_queries: int | None = None,
                   window_s: int = 86400, rate_per_s: float | None = None, burst: int | None = None) -> str:
        """Create a client; returns its API key (shown once: only its keyed hash is stored). The name is
        checked and NFKC-normalized (names.py) and must not be confusable with an existing one."""
        if role not in ROLES:
            raise ServerDBError(f"role {role!r}: use one of {', '.join(ROLES)}")
        name = normalize_name(name)
        _check_budget(max_queries, window_s, rate_per_s, burst)
        key_id, key = new_key()
        c = Client(name=name, name_skeleton=skeleton(name), role=role, key_id=key_id, key_hash=self.hasher.hash(key),
                   created_at=utcnow(), max_queries=max_queries, window_s=window_s, window_used=0, queries_total=0,
                   rate_per_s=rate_per_s, burst=burst)
        try:
            with self.session.begin() as s:
                self._refuse_taken(s, name)
                s.add(c)
        except IntegrityError:  # a concurrent add won the race
            with self.session() as s:
                self._refuse_taken(s, name)
            raise
        return key

    @staticmethod
    def _refuse_taken(s: Session, name: str) -> None:
        other = s.scalar(select(Client.name).where(or_(Client.name == name, Client.name_skeleton == skeleton(name))))
        if other == name:
            raise ClientExists(f"a client named {name!r} already exists: pick another name, or "
                               f"`secquant server rotate-key {name}` for a new key")
        if other is not None:
            raise ClientExists(f"the client name {name!r} is confusable with the existing client {clean(other)!r}: "
                               "pick a name that looks different")

    def rotate_key(self, name: str) -> str:
        """A new key for the client (the old one stops working at once); also un-revokes it."""
        key_id, key = new_key()
        h = self.hasher.hash(key)
        with self.session.begin() as s:
            c = self._get(s, name)
            c.key_id, c.key_hash, c.rotated_at, c.revoked_at = key_id, h, utcnow(), None
        return key

    def revoke(self, name: str) -> None:
        with self.session.begin() as s:
            c = self._get(s, name)
            if c.revoked_at is None:
                c.revoked_at = utcnow()

    def set_budget(self, name: str, *, max_queries: int | None = None, window_s: int | None = None,
                   rate_per_s: float | None = None, burst: int | None = None, unlimited: bool = False) -> dict:
        """Change the given limits (None leaves one as it is; `unlimited` clears all of them)."""
        with self.session.begin() as s:
            c = self._get(s, name)
            if unlimited:
                c.max_queries = c.rate_per_s = c.burst = None
            if max_queries is not None:
                c.max_queries = max_queries
            if window_s is not None:
                c.window_s = window_s
                c.window_start, c.window_used = None, 0
            if rate_per_s is not None:
                c.rate_per_s = rate_per_s
            if burst is not None:
                c.burst = burst
            _check_budget(c.max_queries, c.window_s, c.rate_per_s, c.burst)
            return c.public()

    def list_clients(self) -> list[dict]:
        with self.session() as s:
            return [c.public() for c in s.scalars(select(Client).order_by(Client.id))]

    def client(self, name: str) -> dict:
        with self.session() as s:
            return self._get(s, name).public()

    # -- requests ----------------------------------------------------------------------------------

    def authenticate(self, key: str | None) -> Principal | None:
        """The live client holding `key`, or None. A legacy argon2id record that matches is replaced
        by its HMAC record (unless the key was rotated meanwhile)."""
        key = key or ""
        key_id = key_id_of(key)
        c = None
        if key_id is not None:
            with self.session() as s:
                c = s.scalar(select(Client).where(Client.key_id == key_id))
        live = c is not None and c.revoked_at is None
        verdict = self.hasher.verify(key, c.key_hash if live else None)
        if verdict is Verdict.BAD:
            return None
        if verdict is Verdict.OK_REHASH:
            with self.session.begin() as s:
                s.execute(update(Client).where(Client.id == c.id, Client.key_hash == c.key_hash)
                          .values(key_hash=self.hasher.hash(key)))
        return Principal(c.id, c.name, c.role, c.max_queries, c.window_s, c.rate_per_s, c.burst)

    def key_record_counts(self) -> dict[str, int]:
        """Live clients by key record: 'hmac' (current secret), 'legacy' (argon2id, replaced on first
        use) and 'other_secret' (made under another server secret: these keys cannot work until the
        secret file is restored or the key is rotated)."""
        counts = {"hmac": 0, "legacy": 0, "other_secret": 0}
        with self.session() as s:
            for h in s.scalars(select(Client.key_hash).where(Client.revoked_at.is_(None))):
                counts["legacy" if is_legacy(h) else "other_secret" if self.hasher.other_secret(h) else "hmac"] += 1
        return counts

    def consume(self, client_id: int, rows: int, now: float | None = None) -> float:
        """Count `rows` against the client's budget window; 0.0 when granted, else the seconds until
        the window resets (nothing counted). Atomic in the database: concurrent servers share it."""
        now = time.time() if now is None else now
        with self.session.begin() as s:
            s.execute(update(Client).where(
                Client.id == client_id,
                or_(Client.window_start.is_(None), Client.window_start + Client.window_s <= now),
            ).values(window_start=now, window_used=0))
            res = s.execute(update(Client).where(
                Client.id == client_id,
                or_(Client.max_queries.is_(None), Client.window_used + rows <= Client.max_queries),
            ).values(window_used=Client.window_used + rows, queries_total=Client.queries_total + rows))
            if res.rowcount == 1:
                return 0.0
            c = s.get(Client, client_id)
            if c is None:
                return float("inf")
            if c.max_queries is not None and rows > c.max_queries:
                return float("inf")
            return max(0.0, (c.window_start or now) + c.window_s - now)

    # -- audit ---------------------------------------------------------------------------------------

    def audit(self, *, method: str, route: str, status: int, client_id: int | None = None,
              client_name: str | None = None, input_sha256: str | None = None, rows: int | None = None,
              latency_ms: float | None = None, detail: str | None = None, remote_addr: str | None = None) -> None:
        """Append one row; text from outside (route, names, detail, address) is cleaned of terminal
        escapes and control characters first (safetext.clean)."""
        with self.session.begin() as s:
            s.add(AuditEntry(ts=utcnow(), client_id=client_id, client_name=_cut(client_name, 100),
                             method=_cut(method, 10), route=_cut(route, 200), status=status,
                             input_sha256=input_sha256, rows=rows, latency_ms=latency_ms, detail=_cut(detail, 500),
                             remote_addr=_cut(remote_addr, 64)))

    def audit_log(self, *, limit: int = 100, client: str | None = None, since: dt.datetime | None = None,
                  status: int | None = None) -> list[dict]:
        """Newest first."""
        q = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(max(1, min(int(limit), 10000)))
        conds = []
        if client is not None:
            conds.append(AuditEntry.client_name == client)
        if since is not None:
            conds.append(AuditEntry.ts >= since)
        if status is not None:
            conds.append(AuditEntry.status == status)
        if conds:
            q = q.where(and_(*conds))
        with self.session() as s:
            return [e.public() for e in s.scalars(q)]


def _cut(text: str | None, n: int) -> str | None:
    text = clean(text)
    return text if text is None or len(text) <= n else text[: n - 1] + "\u2026"


def _check_budget(max_queries, window_s, rate_per_s, burst) -> None:
    if max_queries is not None and max_queries < 0:
        raise ServerDBError("--queries must be >= 0")
    if window_s is not None and window_s < 1:
        raise ServerDBError("--window must be at least 1 second")
    if rate_per_s is not None and rate_per_s <= 0:
        raise ServerDBError("--rate must be > 0 rows per second")
    if burst is not None and burst < 1:
        raise ServerDBError("--burst must be at least 1")
