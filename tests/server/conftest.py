"""Fixtures for the server tests: sealed digits models, keys, databases (SQLite always, PostgreSQL
when SECQUANT_TEST_POSTGRES_URL names a server, as .ci/run sets it up)."""

from __future__ import annotations

import copy
import os
import shutil
import warnings
from pathlib import Path

import pytest

PG_ENV = "SECQUANT_TEST_POSTGRES_URL"
PG_SKIP = (f"PostgreSQL variant skipped: set {PG_ENV}=postgresql://USER:PW@HOST:PORT/DB to a disposable database "
           "(.ci/run starts one with Debian's postgresql)")


@pytest.fixture(scope="session")
def server_keys(tmp_path_factory):
    from secquant.security import keygen

    d = tmp_path_factory.mktemp("server-keys")
    return keygen(d / "owner"), keygen(d / "other")


@pytest.fixture(scope="session")
def sealed_digits(digits_artifact, server_keys, tmp_path_factory) -> Path:
    """builtin:digits w8a16 sealed to `owner` (no model.onnx: the PyTorch backend)."""
    from secquant.security import seal

    owner, _ = server_keys
    return seal(digits_artifact("w8a16"), [owner.recipient.read_text().strip()], owner.sign_key,
                tmp_path_factory.mktemp("sealed") / "digits-w8a16.age")


@pytest.fixture(scope="session")
def sealed_digits_onnx(digits_artifact, server_keys, tmp_path_factory) -> Path:
    """builtin:digits w8a8 with an exported model.onnx, sealed to `owner` (the ONNX Runtime backend)."""
    from secquant.runtime import export_onnx
    from secquant.security import seal

    owner, _ = server_keys
    d = tmp_path_factory.mktemp("onnx-art")
    art = d / "digits-w8a8"
    shutil.copytree(digits_artifact("w8a8"), art)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_onnx(art)
    return seal(art, [owner.recipient.read_text().strip()], owner.sign_key, d / "digits-w8a8.age")


@pytest.fixture(scope="session")
def served_base(sealed_digits, server_keys):
    """The sealed w8a16 digits model opened once; tests take a deep copy (see `served`)."""
    from secquant.server import open_served

    owner, _ = server_keys
    return open_served(sealed_digits, owner.identity, owner.verify_key)


@pytest.fixture
def served(served_base):
    """A fresh ServedModel per test (its own weights, guard and canary): tests may corrupt it."""
    from secquant.server import ServedModel

    return ServedModel(copy.deepcopy(served_base.qm))


def _reset_postgres(url: str) -> None:
    from sqlalchemy import text

    from secquant.server.db import make_engine

    eng = make_engine(url)
    with eng.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS audit_log, clients, alembic_version CASCADE"))
    eng.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path) -> str:
    """An empty database: a SQLite file, and the PostgreSQL server of SECQUANT_TEST_POSTGRES_URL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'server.db'}"
    url = os.environ.get(PG_ENV)
    if not url:
        pytest.skip(PG_SKIP)
    _reset_postgres(url)
    return url


@pytest.fixture
def sqlite_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'server.db'}"


@pytest.fixture
def store_factory(tmp_path):
    """Store(url) (a PostgreSQL one with a secret file in tmp_path, shared by the stores of one test);
    closed at teardown."""
    from secquant.server import Store

    made = []

    def make(url: str):
        s = Store(url, secret_file=None if url.startswith("sqlite") else tmp_path / "pg.secret")
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()
