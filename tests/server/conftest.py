"""Fixtures of the server tests: real databases (SQLite and PostgreSQL), services, an API
client with tokens of each role, and bundle builders.

PostgreSQL: one uniquely named database per test session on 127.0.0.1:5432 (user
``postgres``, trust auth), dropped at the end. Tests that use it are skipped, saying so,
only when nothing listens on 5432.
"""

from __future__ import annotations

import socket
import tarfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from sqlalchemy import create_engine, text

from fleet_server.auth import mint
from fleet_server.config import ServerSettings, load_server_settings
from fleet_server.domain import Role
from fleet_server.store import migrate, tokens
from fleet_server.store.engine import Database
from fleet_server.store.models import Base
from tests import modelgen
from tests.broker import mosquitto  # noqa: F401  (the session broker fixture)

with warnings.catch_warnings():  # starlette asks for httpx2; httpx is what we ship
    warnings.simplefilter("ignore")
    import fastapi.testclient  # noqa: F401

PG_HOST, PG_PORT = "127.0.0.1", 5432
PG_ADMIN_URL = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/postgres"


def postgres_listening() -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((PG_HOST, PG_PORT)) == 0


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, migrated; dropped at the end."""
    if not postgres_listening():
        pytest.skip(f"no PostgreSQL listens on {PG_HOST}:{PG_PORT} (scripts/test starts one)")
    name = f"fleet_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+psycopg://postgres@{PG_HOST}:{PG_PORT}/{name}"
    db = Database(url)
    migrate.upgrade(db)
    db.dispose()
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


@pytest.fixture(scope="session")
def sqlite_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A migrated SQLite file for this session."""
    url = f"sqlite:///{tmp_path_factory.mktemp('sqlite') / 'fleet.db'}"
    db = Database(url)
    migrate.upgrade(db)
    db.dispose()
    return url


def _empty(db: Database) -> None:
    with db.write() as session:
        for table in reversed(Base.metadata.sorted_tables):
            session.execute(table.delete())


@pytest.fixture(
    params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)],
)
def db(request: pytest.FixtureRequest) -> Iterator[Database]:
    """An empty, migrated database: SQLite and PostgreSQL (each test runs on both)."""
    url = request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url")
    database = Database(url)
    _empty(database)
    yield database
    database.dispose()


@pytest.fixture
def sqlite_db(sqlite_url: str) -> Iterator[Database]:
    """An empty, migrated SQLite database (for tests that need only one dialect)."""
    database = Database(sqlite_url)
    _empty(database)
    yield database
    database.dispose()


def settings_for(data_dir: Path, url: str, **extra: Any) -> ServerSettings:
    """Server settings for tests: inline validation, the given database."""
    overrides: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": url,
        "validation": {"isolation": "inline"},
    }
    overrides.update(extra)
    return load_server_settings(None, overrides)


def make_token(db: Database, role: Role, name: str | None = None) -> str:
    """An API token of ``role`` in ``db``; returns the secret."""
    secret = mint()
    with db.write() as session:
        tokens.create_api_token(
            session,
            name=name or role.value,
            role=role,
            token_hash=secret.hash,
            prefix=secret.prefix,
            actor="test",
        )
    return secret.token


# --- bundles --------------------------------------------------------------------------

X = np.array([[1.0, 2.0, 3.0], [-1.0, 0.5, 0.0]], np.float32)


def affine_expected(x: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    w, b = modelgen.affine_weights(3, 2)
    return np.asarray(x @ w + b, np.float32)


@dataclass(frozen=True)
class BundleFactory:
    """Builds real bundle archives around the tiny affine ONNX model."""

    root: Path

    def __call__(
        self,
        name: str = "affine",
        version: str = "1.0.0",
        *,
        offset: float = 0.0,
        manifest_extra: dict[str, Any] | None = None,
    ) -> Path:
        """A ``.tgz`` bundle whose golden vector is off by ``offset`` (0: it passes)."""
        src = self.root / f"{name}-{version}-{uuid.uuid4().hex[:6]}"
        (src / "g").mkdir(parents=True)
        modelgen.make_onnx_affine(src / "model.onnx")
        np.save(src / "g" / "x.npy", X)
        np.save(src / "g" / "y.npy", affine_expected(X) + np.float32(offset))
        manifest = {
            "name": name,
            "version": version,
            "format": "onnx",
            "model": "model.onnx",
            "inputs": [{"name": "x", "shape": [None, 3], "dtype": "float32"}],
            "outputs": [{"name": "y", "shape": [None, 2], "dtype": "float32"}],
            "golden": [{"name": "pair", "inputs": {"x": "g/x.npy"}, "outputs": {"y": "g/y.npy"}}],
            **(manifest_extra or {}),
        }
        (src / "model.yaml").write_text(yaml.safe_dump(manifest), encoding="utf-8")
        archive = self.root / f"{src.name}.tgz"
        with tarfile.open(archive, "w:gz") as tf:
            for path in sorted(src.rglob("*")):
                tf.add(path, arcname=str(path.relative_to(src)), recursive=False)
        return archive


@pytest.fixture
def bundle(tmp_path: Path) -> BundleFactory:
    """``bundle(name, version, offset=...)`` -> a .tgz bundle path."""
    (tmp_path / "bundles").mkdir()
    return BundleFactory(tmp_path / "bundles")
