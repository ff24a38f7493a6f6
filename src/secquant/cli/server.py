"""CLI commands: `secquant serve` (the inference server) and `secquant server ...` (clients, budgets,
audit log, database migrations)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from .common import MIN_RELEASE_HELP, describe_release, err, factory_option, out, read_passphrase, user_errors

DB_HELP = "server database: a SQLite file path or URL (sqlite:///PATH), or postgresql://USER:PW@HOST/DB"
SECRET_HELP = ("file holding the secret API keys are hashed under (created 0600 if missing); default: DB.secret "
               "next to a SQLite database; required with PostgreSQL")
DEFAULT_DB_PATH = "secquant-server.db"


def _db_option():
    return typer.Option(DEFAULT_DB_PATH, "--db", envvar="SECQUANT_SERVER_DB", help=DB_HELP)


def _secret_option():
    return typer.Option(None, "--secret-file", envvar="SECQUANT_SERVER_SECRET_FILE", help=SECRET_HELP)


def _cell(value) -> str:
    """A table cell: terminal escapes and control characters removed (rows written by older versions
    were stored raw), rich markup escaped."""
    from ..server.safetext import clean

    return escape(clean(str(value))) if value is not None else "-"

app = typer.Typer()


server = typer.Typer(no_args_is_help=True, help="Manage the inference server: API clients, budgets, audit log.")
app.add_typer(server, name="server")

def _store(db: str, secret_file: Optional[Path]):
    from ..server import Store

    return Store(db, secret_file=secret_file)

@app.command()
@user_errors
def serve(
    sealed: Path = typer.Argument(..., help="sealed model file (secquant seal)"),
    identity: Path = typer.Option(..., "--identity", help="age identity file the model is sealed to (NAME.key)"),
    verify_key: Path = typer.Option(..., "--verify-key", help="signer's public key (NAME.sign.pub)"),
    db: str = _db_option(),
    secret_file: Optional[Path] = _secret_option(),
    host: str = typer.Option("127.0.0.1", "--host", help="address to listen on"),
    port: int = typer.Option(8000, "--port", min=0, max=65535, help="TCP port"),
    backend: str = typer.Option("auto", "--backend", help="auto (ONNX Runtime when the model carries "
                                "model.onnx), onnxruntime or pytorch"),
    threads: int = typer.Option(1, "--threads", min=1, help="ONNX Runtime intra-op threads"),
    top_k: Optional[int] = typer.Option(None, "--top-k", min=1, help="hardening: return only the k best "
                                        "classes per example"),
    round_digits: Optional[int] = typer.Option(None, "--round", min=0, max=8, help="hardening: round scores "
                                               "and embeddings to this many decimals"),
    max_batch: int = typer.Option(64, "--max-batch", min=1, help="most examples in one request"),
    max_new_tokens: int = typer.Option(256, "--max-new-tokens", min=1, max=4096, help="most tokens one "
                                       "/v1/generate request may ask for (causal LMs)"),
    integrity_interval: float = typer.Option(30.0, "--integrity-interval", help="seconds between integrity "
                                             "checks of the weights in memory (0: only at start)"),
    auth_failure_limit: int = typer.Option(20, "--auth-failure-limit", min=0, help="bad keys per minute an "
                                           "address (IPv6: a /64) may send before it gets 429 (0: no limit)"),
    auth_refusal_delay: float = typer.Option(1.0, "--auth-refusal-delay", min=0.0, max=30.0,
                                             help="seconds a refused address waits for its 429"),
    factory: Optional[str] = factory_option(),
    passphrase: bool = typer.Option(False, "--passphrase", help="the identity is passphrase-protected "
                                    "(prompted, or $SECQUANT_PASSPHRASE)"),
    log_level: str = typer.Option("info", "--log-level", help="uvicorn log level"),
    ssl_certfile: Optional[Path] = typer.Option(None, "--ssl-certfile", help="serve HTTPS with this PEM "
                                                "certificate (API keys travel in headers)"),
    ssl_keyfile: Optional[Path] = typer.Option(None, "--ssl-keyfile", help="the certificate's PEM private key"),
    min_release: Optional[int] = typer.Option(None, "--min-release", min=0, help=MIN_RELEASE_HELP),
) -> None:
    """Serve a sealed model to authenticated clients (FastAPI + uvicorn).

    The model is decrypted and verified at start and kept in memory only; /healthz is the only
    route without an API key (make one with `secquant server add-client`).
    """
    import ipaddress

    import uvicorn

    from ..errors import SecquantError
    from ..server import ServerConfig, create_app, open_served

    if (ssl_certfile is None) != (ssl_keyfile is None):
        raise SecquantError("give both --ssl-certfile and --ssl-keyfile, or neither")
    for f in (ssl_certfile, ssl_keyfile):
        if f is not None and not f.is_file():
            raise SecquantError(f"{f} does not exist")
    store = _store(db, secret_file)
    model = open_served(sealed, identity, verify_key, passphrase=read_passphrase(passphrase), backend=backend,
                        threads=threads, factory=factory, min_release=min_release)
    cfg = ServerConfig(top_k=top_k, round_digits=round_digits, max_batch=max_batch, max_new_tokens=max_new_tokens,
                       integrity_interval=integrity_interval, auth_failures_per_minute=auth_failure_limit or None,
                       auth_refusal_delay_s=auth_refusal_delay)
    web = create_app(model, store, cfg)
    if not store.list_clients():
        err.print("warning: no API clients yet: add one with `secquant server add-client NAME --role user`",
                  highlight=False, soft_wrap=True)
    lost = store.key_record_counts()["other_secret"]
    if lost:
        err.print(f"warning: {lost} client key(s) were hashed under another server secret (was the secret file "
                  "lost or replaced?): they will get 401 until that file is restored or their keys are rotated "
                  "(`secquant server rotate-key NAME`)", highlight=False, soft_wrap=True)
    scheme = "https" if ssl_certfile else "http"
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if scheme == "http" and not loopback:
        err.print(f"warning: serving plain HTTP on {host}: API keys cross the network in clear; use "
                  "--ssl-certfile/--ssl-keyfile or a TLS-terminating proxy", highlight=False, soft_wrap=True)
    err.print(f"serving {model.spec} ({model.recipe}, {describe_release(model.qm)}, {model.backend} backend) on "
              f"{scheme}://{host}:{port}",
              highlight=False, soft_wrap=True)
    try:
        uvicorn.run(web, host=host, port=port, log_level=log_level,
                    ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
                    ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None)
    finally:
        store.close()

@server.command("add-client")
@user_errors
def add_client(
    name: str = typer.Argument(..., help="client name"),
    role: str = typer.Option("user", "--role", help="user (predict only) or admin (also manage clients, "
                             "read the audit log)"),
    queries: Optional[int] = typer.Option(None, "--queries", min=0, help="most examples per budget window"),
    window: int = typer.Option(86400, "--window", min=1, help="budget window in seconds"),
    rate: Optional[float] = typer.Option(None, "--rate", help="rate limit: examples per second"),
    burst: Optional[int] = typer.Option(None, "--burst", min=1, help="rate limit: bucket size in examples"),
    db: str = _db_option(),
    secret_file: Optional[Path] = _secret_option(),
) -> None:
    """Create a client and print its API key (once: only a keyed hash of it is stored).

    Names: 1-64 characters from A-Z a-z 0-9 . _ - @, starting and ending with a letter or digit
    (NFKC-normalized); a name confusable with an existing one (Ann / ann, paypal / paypa1) is refused.
    """
    from ..server.names import normalize_name

    key = _store(db, secret_file).add_client(name, role, max_queries=queries, window_s=window, rate_per_s=rate,
                                             burst=burst)
    err.print(f"added {role} client {escape(normalize_name(name))}; its API key (shown only now):",
              highlight=False)
    sys.stdout.write(key + "\n")

@server.command("rotate-key")
@user_errors
def rotate_key(name: str = typer.Argument(..., help="client name"), db: str = _db_option(),
               secret_file: Optional[Path] = _secret_option()) -> None:
    """Give a client a new API key; the old one stops working at once."""
    key = _store(db, secret_file).rotate_key(name)
    err.print(f"new API key for {escape(name)} (shown only now; the old key no longer works):", highlight=False)
    sys.stdout.write(key + "\n")

@server.command()
@user_errors
def revoke(name: str = typer.Argument(..., help="client name"), db: str = _db_option(),
           secret_file: Optional[Path] = _secret_option()) -> None:
    """Revoke a client's key (rotate-key issues a new one)."""
    _store(db, secret_file).revoke(name)
    err.print(f"revoked {escape(name)}", highlight=False)

@server.command("set-budget")
@user_errors
def set_budget(
    name: str = typer.Argument(..., help="client name"),
    queries: Optional[int] = typer.Option(None, "--queries", min=0, help="most examples per budget window"),
    window: Optional[int] = typer.Option(None, "--window", min=1, help="budget window in seconds (restarts it)"),
    rate: Optional[float] = typer.Option(None, "--rate", help="rate limit: examples per second"),
    burst: Optional[int] = typer.Option(None, "--burst", min=1, help="rate limit: bucket size in examples"),
    unlimited: bool = typer.Option(False, "--unlimited", help="clear all limits (others given are then set)"),
    db: str = _db_option(),
    secret_file: Optional[Path] = _secret_option(),
) -> None:
    """Set a client's query budget and rate limit; print the client as JSON."""
    from ..errors import SecquantError

    if not unlimited and queries is None and window is None and rate is None and burst is None:
        raise SecquantError("nothing to change: give --queries, --window, --rate, --burst or --unlimited")
    c = _store(db, secret_file).set_budget(name, max_queries=queries, window_s=window, rate_per_s=rate,
                                           burst=burst, unlimited=unlimited)
    sys.stdout.write(json.dumps(c) + "\n")

@server.command("list-clients")
@user_errors
def list_clients(
    as_json: bool = typer.Option(False, "--json", help="print JSON"),
    db: str = _db_option(),
    secret_file: Optional[Path] = _secret_option(),
) -> None:
    """List the clients, their roles, budgets and usage (never keys)."""
    rows = _store(db, secret_file).list_clients()
    if as_json:
        sys.stdout.write(json.dumps(rows) + "\n")
        return
    t = Table(title="clients")
    cols = ["name", "role", "key_id", "revoked", "max_queries", "window_s", "window_used", "queries_total",
            "rate_per_s", "burst"]
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(_cell(r[c]) for c in cols))
    out.print(t)

@server.command("audit-log")
@user_errors
def audit_log(
    limit: int = typer.Option(50, "--limit", min=1, max=10000, help="newest N entries"),
    client: Optional[str] = typer.Option(None, "--client", help="only this client"),
    status: Optional[int] = typer.Option(None, "--status", help="only this HTTP status"),
    as_json: bool = typer.Option(False, "--json", help="print JSON lines"),
    db: str = _db_option(),
    secret_file: Optional[Path] = _secret_option(),
) -> None:
    """Show the audit log, newest first (inputs appear only as their SHA-256)."""
    rows = _store(db, secret_file).audit_log(limit=limit, client=client, status=status)
    if as_json:  # json.dumps writes every control character as a \u escape
        sys.stdout.write("".join(json.dumps(r) + "\n" for r in rows))
        return
    t = Table(title="audit log (newest first)")
    cols = ["ts", "client", "remote_addr", "method", "route", "status", "rows", "input_sha256", "detail"]
    for c in cols:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*(_cell(r[c]) for c in cols))
    out.print(t)

@server.command()
@user_errors
def migrate(db: str = _db_option(), secret_file: Optional[Path] = _secret_option()) -> None:
    """Create or upgrade the server database schema (Alembic); other commands do this too."""
    from ..server.db import current_revision

    store = _store(db, secret_file)
    err.print(f"database at revision {current_revision(store.engine)}", highlight=False)
