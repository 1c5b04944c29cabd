"""Apply the Alembic migrations in ``fleet_server/store/migrations`` programmatically.

``edge-fleet serve`` and ``edge-fleet db upgrade`` both call :func:`upgrade`. On
PostgreSQL, an advisory lock makes replicas that start together apply them once.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.store.engine import Database, translate

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
_PG_LOCK_KEY = 0x6564_6765  # "edge": one advisory lock key for migrations


def _config(connection: Connection | None = None) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    """The newest migration revision shipped with this code."""
    rev = ScriptDirectory.from_config(_config()).get_current_head()
    assert rev is not None
    return rev


def current(db: Database) -> str | None:
    """The revision the database is at (``None`` for an empty database).

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    try:
        with db.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise translate(exc) from exc


def upgrade(db: Database, revision: str = "head") -> tuple[str | None, str]:
    """Bring the database to ``revision``; returns ``(before, after)`` revisions.

    Raises:
        StoreUnavailable: the database cannot be reached.
        StoreError: a migration failed (the transaction is rolled back on PostgreSQL).
    """
    try:
        with db.engine.begin() as conn:
            if db.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
            before = MigrationContext.configure(conn).get_current_revision()
            command.upgrade(_config(conn), revision)
            after = MigrationContext.configure(conn).get_current_revision()
    except SQLAlchemyError as exc:
        raise translate(exc) from exc
    return before, after or ""
