"""Client management, authentication, query budgets and the audit log, on one database."""

from __future__ import annotations

import datetime as dt
import os
import time
from dataclasses import dataclass

from sqlalchemy import and_, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .auth import KeyHasher, key_id_of, new_key
from .db import ROLES, AuditEntry, Client, ServerDBError, make_engine, migrate, utcnow


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
    """The server database; `migrate_schema=True` (the default) creates or upgrades the schema first."""

    def __init__(self, db: str | os.PathLike, *, migrate_schema: bool = True, hasher: KeyHasher | None = None) -> None:
        self.engine = make_engine(db)
        if migrate_schema:
            migrate(self.engine)
        self.session: sessionmaker[Session] = sessionmaker(self.engine, expire_on_commit=False)
        self._hasher = hasher

    @property
    def hasher(self) -> KeyHasher:
        if self._hasher is None:  # built lazily: computing the dummy hash costs one argon2id run
            self._hasher = KeyHasher()
        return self._hasher

    def close(self) -> None:
        self.engine.dispose()

    # -- clients ---------------------------------------------------------------------------------

    def _get(self, s: Session, name: str) -> Client:
        c = s.scalar(select(Client).where(Client.name == name))
        if c is None:
            raise ServerDBError(f"no client named {name!r}: see `secquant server list-clients`")
        return c

    def add_client(self, name: str, role: str = "user", *, max_queries: int | None = None,
                   window_s: int = 86400, rate_per_s: float | None = None, burst: int | None = None) -> str:
        """Create a client; returns its API key (shown once: only its hash is stored)."""
        if role not in ROLES:
            raise ServerDBError(f"role {role!r}: use one of {', '.join(ROLES)}")
        if not name or len(name) > 100 or not name.isprintable():
            raise ServerDBError("a client name is 1-100 printable characters")
        _check_budget(max_queries, window_s, rate_per_s, burst)
        key_id, key = new_key()
        c = Client(name=name, role=role, key_id=key_id, key_hash=self.hasher.hash(key), created_at=utcnow(),
                   max_queries=max_queries, window_s=window_s, window_used=0, queries_total=0,
                   rate_per_s=rate_per_s, burst=burst)
        try:
            with self.session.begin() as s:
                s.add(c)
        except IntegrityError:
            raise ServerDBError(f"a client named {name!r} already exists: pick another name, or "
                                f"`secquant server rotate-key {name}` for a new key") from None
        return key

    def rotate_key(self, name: str) -> str:
        """A new key for the client (the old one stops working at once); also un-revokes it."""
        key_id, key = new_key()
        h = self.hasher.hash(key)
        with self.session.begin() as s:
            c = self._get(s, name)
            old = c.key_id
            c.key_id, c.key_hash, c.rotated_at, c.revoked_at = key_id, h, utcnow(), None
        self.hasher.forget(old)
        return key

    def revoke(self, name: str) -> None:
        with self.session.begin() as s:
            c = self._get(s, name)
            if c.revoked_at is None:
                c.revoked_at = utcnow()
            old = c.key_id
        self.hasher.forget(old)

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
        """The live client holding `key`, or None (same argon2id work for unknown and revoked ids)."""
        key = key or ""
        key_id = key_id_of(key)
        c = None
        if key_id is not None:
            with self.session() as s:
                c = s.scalar(select(Client).where(Client.key_id == key_id))
        live = c is not None and c.revoked_at is None
        if not self.hasher.verify(key, c.key_hash if live else None, key_id if live else None):
            return None
        return Principal(c.id, c.name, c.role, c.max_queries, c.window_s, c.rate_per_s, c.burst)

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
              latency_ms: float | None = None, detail: str | None = None) -> None:
        with self.session.begin() as s:
            s.add(AuditEntry(ts=utcnow(), client_id=client_id, client_name=client_name, method=method[:10],
                             route=route[:200], status=status, input_sha256=input_sha256, rows=rows,
                             latency_ms=latency_ms, detail=detail[:500] if detail else None))

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


def _check_budget(max_queries, window_s, rate_per_s, burst) -> None:
    if max_queries is not None and max_queries < 0:
        raise ServerDBError("--queries must be >= 0")
    if window_s is not None and window_s < 1:
        raise ServerDBError("--window must be at least 1 second")
    if rate_per_s is not None and rate_per_s <= 0:
        raise ServerDBError("--rate must be > 0 rows per second")
    if burst is not None and burst < 1:
        raise ServerDBError("--burst must be at least 1")
