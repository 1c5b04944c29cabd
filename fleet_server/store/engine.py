"""The database handle: engine set-up per dialect, transactions, error translation.

SQLite runs in WAL mode with a busy timeout and foreign keys on. Write transactions on
SQLite start with ``BEGIN IMMEDIATE`` so two writers queue on the busy timeout instead of
failing with a snapshot conflict; read transactions stay deferred and never block writers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from fleet_server.errors import Conflict, StoreError, StoreUnavailable

SQLITE_BUSY_TIMEOUT_MS = 5000


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means "the database cannot be reached right now"."""
    if isinstance(exc, OperationalError):
        return True
    return isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)


def translate(exc: SQLAlchemyError) -> StoreError | Conflict:
    """The fleet error for a SQLAlchemy error (one line, no SQL, no traceback)."""
    if is_unavailable(exc):
        return StoreUnavailable("the database is unavailable; retry shortly")
    if isinstance(exc, IntegrityError):
        return Conflict("the change conflicts with an existing record")
    return StoreError(f"database error: {type(exc).__name__}")


def _sqlite_setup(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves (below)
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = "IMMEDIATE" if conn.get_execution_options().get("fleet_write") else "DEFERRED"
        conn.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """One engine and its sessions. Thread-safe; share one per process."""

    def __init__(
        self, url: str, *, pool_size: int = 10, busy_timeout_ms: int = SQLITE_BUSY_TIMEOUT_MS
    ) -> None:
        """Create the engine (connects lazily). ``busy_timeout_ms``: how long a SQLite
        writer waits for the lock before the database counts as unavailable.

        Raises:
            StoreError: the URL is malformed or names a driver that is not installed.
        """
        try:
            parsed = make_url(url)
        except Exception as exc:
            raise StoreError(f"invalid database URL: {exc}") from exc
        self.url = url
        self.dialect = parsed.get_backend_name()
        kwargs: dict[str, Any] = {}
        if self.dialect == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        else:
            kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
            kwargs["pool_timeout"] = 10
            if self.dialect == "postgresql":
                kwargs["connect_args"] = {"connect_timeout": 5}
        try:
            self.engine = create_engine(parsed, **kwargs)
        except (ImportError, SQLAlchemyError) as exc:
            raise StoreError(f"cannot use database URL: {exc}") from exc
        if self.dialect == "sqlite":
            _sqlite_setup(self.engine, busy_timeout_ms)

        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(
            self.engine.execution_options(fleet_write=True), expire_on_commit=False
        )

    @contextmanager
    def _session(self, factory: sessionmaker[Session]) -> Iterator[Session]:
        try:
            with factory.begin() as session:
                yield session
        except SQLAlchemyError as exc:
            raise translate(exc) from exc

    def read(self) -> AbstractContextManager[Session]:
        """A read-only transaction: ``with db.read() as session: ...``.

        Raises:
            StoreUnavailable: the database cannot be reached.
            StoreError: another database error.
        """
        return self._session(self._reader)

    def write(self) -> AbstractContextManager[Session]:
        """A read-write transaction, committed when the block exits without an error.

        Raises:
            StoreUnavailable: the database cannot be reached or stayed locked.
            Conflict: a uniqueness or foreign-key constraint was violated.
            StoreError: another database error.
        """
        return self._session(self._writer)

    def ping(self) -> None:
        """Check that the database answers.

        Raises:
            StoreUnavailable: it does not.
        """
        with self.read() as session:
            session.execute(text("SELECT 1"))

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({make_url(self.url).render_as_string(hide_password=True)!r})"
