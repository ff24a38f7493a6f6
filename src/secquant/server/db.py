"""Server state in SQL (SQLAlchemy 2): API clients with their budgets, and the audit log.

SQLite by default, PostgreSQL with a ``postgresql://`` URL (driven by psycopg 3). The schema is
created and upgraded by the Alembic migrations shipped in ``secquant/server/migrations``, never by
``create_all``, so a database made by one version of secquant upgrades cleanly to the next. A new
SQLite file is created with mode 0600 (SQLite gives its -wal and -shm files the same mode).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import stat
from pathlib import Path

from sqlalchemy import (BigInteger, CheckConstraint, DateTime, Float, Integer, MetaData, String, create_engine, event,
    text
)
from sqlalchemy.engine import Engine, make_url
from sqlalchemy.exc import ArgumentError, SQLAlchemyError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..errors import SecquantError

log = logging.getLogger("secquant.server")
DEFAULT_DB = "sqlite:///./secquant-server.db"
ROLES = ("user", "admin")
# Autoincrementing 64-bit keys: SQLite only autoincrements an INTEGER PRIMARY KEY.
BigId = BigInteger().with_variant(Integer, "sqlite")


class ServerDBError(SecquantError):
    """The server database cannot be opened, is not migrated, or a client operation is invalid."""


class ClientNotFound(ServerDBError):
    """No client has the given name."""


class ClientExists(ServerDBError):
    """A client with the given name (or a name confusable with it) already exists."""


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention={
        "ix": "ix_%(column_0_label)s", "uq": "uq_%(table_name)s_%(column_0_name)s",
        "pk": "pk_%(table_name)s"})


class Client(Base):
    """An API client: one role, one live key (id in clear, HMAC of the key; see auth.py), budgets.

`name_skeleton` (see names.py) is unique, so no two clients have names a person could confuse.

    Budgets: at most `max_queries` rows per window of `window_s` seconds (persisted, shared by all
    server processes on the database); a token bucket of `burst` rows refilled at `rate_per_s`
    rows per second (per server process). NULL means unlimited.
    """

    __tablename__ = "clients"
    __table_args__ = (CheckConstraint("role IN ('user', 'admin')", name="ck_clients_role"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    name_skeleton: Mapped[str] = mapped_column(String(100), unique=True, nullable=False)
    role: Mapped[str] = mapped_column(String(16), nullable=False)
    key_id: Mapped[str] = mapped_column(String(32), unique=True, nullable=False)
    key_hash: Mapped[str] = mapped_column(String(255), nullable=False)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow)
    rotated_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True))
    max_queries: Mapped[int | None] = mapped_column(BigInteger)
    window_s: Mapped[int] = mapped_column(Integer, nullable=False, default=86400)
    window_start: Mapped[float | None] = mapped_column(Float)
    window_used: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    queries_total: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    rate_per_s: Mapped[float | None] = mapped_column(Float)
    burst: Mapped[int | None] = mapped_column(Integer)

    def public(self) -> dict:
        """Everything but the key hash, JSON-ready."""
        return {"name": self.name, "role": self.role, "key_id": self.key_id,
                "created_at": _iso(self.created_at), "rotated_at": _iso(self.rotated_at),
                "revoked": self.revoked_at is not None, "revoked_at": _iso(self.revoked_at),
                "max_queries": self.max_queries, "window_s": self.window_s, "window_used": self.window_used,
                "queries_total": self.queries_total, "rate_per_s": self.rate_per_s, "burst": self.burst}


class AuditEntry(Base):
    """One request (or one server event, method 'EVENT'): who (client, peer address), when, what,
    outcome; the input only as its sha256. Text columns hold no control characters (safetext.clean)."""

    __tablename__ = "audit_log"
    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    ts: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), nullable=False, default=utcnow, index=True)
    client_id: Mapped[int | None] = mapped_column(Integer, index=True)
    client_name: Mapped[str | None] = mapped_column(String(100))
    method: Mapped[str] = mapped_column(String(10), nullable=False)
    route: Mapped[str] = mapped_column(String(200), nullable=False)
    status: Mapped[int] = mapped_column(Integer, nullable=False)
    input_sha256: Mapped[str | None] = mapped_column(String(64))
    rows: Mapped[int | None] = mapped_column(Integer)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    detail: Mapped[str | None] = mapped_column(String(500))
    remote_addr: Mapped[str | None] = mapped_column(String(64))

    def public(self) -> dict:
        return {"id": self.id, "ts": _iso(self.ts), "client": self.client_name, "client_id": self.client_id,
                "remote_addr": self.remote_addr, "method": self.method, "route": self.route,
                "status": self.status, "input_sha256": self.input_sha256, "rows": self.rows,
                "latency_ms": self.latency_ms, "detail": self.detail}


def _iso(t: dt.datetime | None) -> str | None:
    if t is None:
        return None
    if t.tzinfo is None:  # SQLite hands back naive datetimes; they were stored as UTC
        t = t.replace(tzinfo=dt.UTC)
    return t.isoformat()


def normalize_url(db: str | os.PathLike) -> str:
    """A SQLAlchemy URL from --db: a URL as given (postgresql:// is driven by psycopg 3), or a path
    meaning a SQLite file."""
    s = str(db)
    if "://" not in s:
        return f"sqlite:///{Path(s).expanduser()}"
    try:
        url = make_url(s)
    except ArgumentError:
        raise ServerDBError(f"--db {s!r} is not a database URL: use sqlite:///PATH, a file path, or "
                            "postgresql://USER:PASSWORD@HOST/DB") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    elif not (url.drivername.startswith("sqlite") or url.drivername.startswith("postgresql")):
        raise ServerDBError(f"--db {url.drivername}://...: only SQLite and PostgreSQL are supported")
    return url.render_as_string(hide_password=False)


def sqlite_path(engine_or_url) -> str | None:
    """The file of a SQLite database (None for PostgreSQL or an in-memory database)."""
    url = make_url(str(engine_or_url.url if isinstance(engine_or_url, Engine) else engine_or_url))
    db = url.database
    if not url.drivername.startswith("sqlite") or not db or db == ":memory:" or db.startswith("file:"):
        return None
    return db


def _create_private(path: str) -> None:
    """Create an empty SQLite file readable by its owner only, unless it exists; warn if an existing
    one is open to others (it holds key records and the audit log)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        return
    except FileExistsError:
        pass
    except OSError:  # a missing directory and the like: migrate() reports it as a user error
        return
    with contextlib.suppress(OSError):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        if mode & 0o077:
            log.warning("the server database %s is open to other users (mode %04o): chmod 600 it", path, mode)


def make_engine(db: str | os.PathLike) -> Engine:
    url = normalize_url(db)
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None:
            _create_private(path)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(conn, _record):
            # WAL: readers run while one writer appends to the log. synchronous=NORMAL: a commit is
            # not fsynced (2-3 commits per request cost ~10 ms each on a busy disk otherwise); the
            # database stays consistent and survives a crash of the server process, but an OS crash or
            # power loss can drop the last transactions. Use PostgreSQL where that matters.
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def alembic_config(engine: Engine):
    """An Alembic Config for the migrations shipped inside the package (works from an installed wheel)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", "secquant.server:migrations")
    cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False).replace("%", "%%"))
    return cfg


def migrate(engine: Engine, revision: str = "head") -> None:
    """Upgrade the database schema to `revision` (creates it on an empty database)."""
    from alembic import command

    cfg = alembic_config(engine)
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, revision)
    except SecquantError:
        raise
    except Exception as e:  # connection refused, bad credentials, read-only file...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ServerDBError(f"cannot open or migrate the server database {engine.url.render_as_string()}: "
                            f"{msg}") from None


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as conn:
        try:
            return conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except SQLAlchemyError:  # no alembic_version table: never migrated
            return None
