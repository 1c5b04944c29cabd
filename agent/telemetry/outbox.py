"""A bounded, ordered, on-disk buffer of messages waiting for the broker.

Telemetry (and the updater's events) are written to the outbox first and published
from it, so that what is produced while the broker is unreachable is sent later, in
order, with its original ``ts`` and ``seq``. The outbox also keeps the persistent
counters behind ``seq`` (:meth:`Outbox.next_seq`).

Storage is one SQLite file (stdlib :mod:`sqlite3`) in WAL mode with
``synchronous=FULL``: every ``put`` and ``next_seq`` is on disk when it returns, so a
power cut loses no committed entry and never lets ``seq`` go backwards (with
``NORMAL``, the last commits before a power cut can be rolled back, and a ``seq``
already sent could then be issued again). The cost is one fsync per write, a few per
telemetry interval; :meth:`Outbox.flush` deletes what it sent in one transaction.
A file that SQLite finds corrupt at start-up is moved aside and a new outbox started;
its ``seq`` counters then restart above the current Unix time in milliseconds, so they
still only increase.

Delivery guarantee: an entry is deleted only after ``publish`` returned True, so nothing
is lost while the agent is off or offline, and an agent killed during a flush sends the
entries it had not yet deleted again (duplicates carry the same ``seq``). With QoS 0
telemetry, True means paho accepted the message on a live connection: a message
written into a socket that dies at that instant is still lost (and shows as a ``seq``
gap). ``telemetry.qos: 1`` makes delivery at-least-once up to the broker. Call
:meth:`Outbox.flush` only while connected: for QoS 1, a transport that queues in memory
while offline also returns True, and that queue does not survive a restart.

The outbox is for one process: several processes on one file would keep wrong counts.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from agent.errors import EdgeError

log = logging.getLogger("agent.telemetry.outbox")

#: ``publish(topic, payload, qos, retain) -> bool``: True when sent (or queued), False
#: when dropped. It must not block, and must not call back into the outbox.
Publish = Callable[[str, bytes, int, bool], bool]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    qos INTEGER NOT NULL,
    retain INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
_DROPPED = "dropped_total"
_SEQ_FLOOR = "seq_floor"


class OutboxError(EdgeError):
    """The outbox file cannot be opened, read or written (disk full, I/O error, closed)."""

    code = "outbox_unavailable"


@dataclass(frozen=True, slots=True)
class OutboxEntry:
    """One buffered message."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool


class Outbox:
    """A bounded, persistent FIFO of MQTT messages, plus persistent counters.

    When full, :meth:`put` drops the oldest entries and counts them in
    :attr:`dropped_total`. Every method may be called from any thread.
    """

    def __init__(self, path: Path, max_entries: int = 10000) -> None:
        """Open (or create) the outbox at ``path``.

        Raises:
            ValueError: ``max_entries`` is below 1.
            OutboxError: the file cannot be created or opened.
        """
        if max_entries < 1:
            raise ValueError(f"max_entries must be at least 1, got {max_entries}")
        self.path = Path(path)
        self.max_entries = max_entries
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            try:
                self._conn: sqlite3.Connection | None = self._open()
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError):
                    raise  # locked, unreadable, disk full: not corruption
                self._conn = self._recover(exc)
            self._length, self._dropped, self._seq_floor = self._load_counters()
        except (OSError, sqlite3.Error) as exc:
            raise OutboxError(f"cannot open the outbox {self.path}: {exc}") from None

    # --- opening ----------------------------------------------------------------------

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(
            self.path, timeout=5.0, isolation_level=None, check_same_thread=False
        )
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA journal_size_limit=4194304")
            conn.executescript(_SCHEMA)
            check = conn.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _recover(self, exc: sqlite3.DatabaseError) -> sqlite3.Connection:
        """Move a corrupt file aside and start an empty outbox whose counters stay ahead."""
        aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
        log.error("outbox %s is corrupt (%s); moved to %s, starting empty", self.path, exc, aside)
        for suffix in ("-wal", "-shm"):
            sidecar = self.path.with_name(self.path.name + suffix)
            if sidecar.exists():
                sidecar.replace(aside.with_name(aside.name + suffix))
        if self.path.exists():
            self.path.replace(aside)
        conn = self._open()
        with _transaction(conn):
            conn.execute(
                "INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)",
                (_SEQ_FLOOR, int(time.time() * 1000)),
            )
        return conn

    def _load_counters(self) -> tuple[int, int, int]:
        conn = self._connection()
        (length,) = conn.execute("SELECT COUNT(*) FROM outbox").fetchone()
        return length, self._meta(conn, _DROPPED), self._meta(conn, _SEQ_FLOOR)

    @staticmethod
    def _meta(conn: sqlite3.Connection, key: str) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise OutboxError(f"the outbox {self.path} is closed")
        return self._conn

    # --- the queue --------------------------------------------------------------------

    def put(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        """Append a message; when over :attr:`max_entries`, drop the oldest. Returns its id.

        Raises:
            ValueError: ``qos`` is not 0, 1 or 2.
            OutboxError: the outbox is closed or cannot be written (disk full, I/O error).
        """
        if qos not in (0, 1, 2):
            raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
        with self._lock:
            conn = self._connection()
            try:
                with _transaction(conn):
                    cursor = conn.execute(
                        "INSERT INTO outbox(topic, payload, qos, retain) VALUES (?, ?, ?, ?)",
                        (topic, bytes(payload), qos, int(bool(retain))),
                    )
                    length = self._length + 1
                    excess = length - self.max_entries
                    if excess > 0:
                        conn.execute(
                            "DELETE FROM outbox WHERE id IN "
                            "(SELECT id FROM outbox ORDER BY id LIMIT ?)",
                            (excess,),
                        )
                        self._set_meta(conn, _DROPPED, self._dropped + excess)
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot write to the outbox {self.path}: {exc}") from None
            if excess > 0:
                self._dropped += excess
                length -= excess
                log.warning("outbox full (%d entries): dropped the oldest", self.max_entries)
            self._length = length
            entry_id = cursor.lastrowid
        assert entry_id is not None
        return entry_id

    def flush(self, publish: Publish, max_items: int = 500) -> int:
        """Publish up to ``max_items`` entries, oldest first; return how many were sent.

        Each entry is deleted once ``publish`` returned True for it; the first False stops
        the flush, so the next one resumes in order. An entry that ``publish`` refuses
        with ``ValueError`` (an invalid topic: it would never go) is dropped and counted
        in :attr:`dropped_total`. Call it again while it returns ``max_items``.

        Raises:
            OutboxError: the outbox is closed or cannot be read or written.
            Exception: whatever ``publish`` raised besides ``ValueError``; the entries
                published before it are deleted first.
        """
        with self._lock:
            conn = self._connection()
            try:
                rows = conn.execute(
                    "SELECT id, topic, payload, qos, retain FROM outbox ORDER BY id LIMIT ?",
                    (max_items,),
                ).fetchall()
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read the outbox {self.path}: {exc}") from None
            last_done: int | None = None
            sent = rejected = 0
            try:
                for entry_id, topic, payload, qos, retain in rows:
                    try:
                        ok = publish(topic, bytes(payload), qos, bool(retain))
                    except ValueError as exc:
                        log.error("outbox entry to %r refused (%s); dropped", topic, exc)
                        rejected += 1
                    else:
                        if not ok:
                            break
                        sent += 1
                    last_done = entry_id
            finally:
                if last_done is not None:
                    self._delete_through(conn, last_done, sent + rejected, rejected)
            return sent

    def _delete_through(
        self, conn: sqlite3.Connection, last_id: int, done: int, rejected: int
    ) -> None:
        try:
            with _transaction(conn):
                conn.execute("DELETE FROM outbox WHERE id <= ?", (last_id,))
                if rejected:
                    self._set_meta(conn, _DROPPED, self._dropped + rejected)
        except sqlite3.Error as exc:
            raise OutboxError(f"cannot delete sent entries from {self.path}: {exc}") from None
        self._length -= done
        self._dropped += rejected

    def peek(self, limit: int = 100) -> list[OutboxEntry]:
        """The oldest ``limit`` entries, left in place (for diagnostics).

        Raises:
            OutboxError: the outbox is closed or cannot be read.
        """
        with self._lock:
            try:
                rows = (
                    self._connection()
                    .execute(
                        "SELECT id, topic, payload, qos, retain FROM outbox ORDER BY id LIMIT ?",
                        (limit,),
                    )
                    .fetchall()
                )
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot read the outbox {self.path}: {exc}") from None
        return [OutboxEntry(i, t, bytes(p), q, bool(r)) for i, t, p, q, r in rows]

    # --- counters ---------------------------------------------------------------------

    def next_seq(self, name: str = "telemetry") -> int:
        """The next value of the persistent counter ``name``: 1, 2, 3, ... across restarts.

        Raises:
            OutboxError: the outbox is closed or cannot be written.
        """
        key = f"seq.{name}"
        with self._lock:
            conn = self._connection()
            try:
                with _transaction(conn):
                    value = max(self._meta(conn, key), self._seq_floor) + 1
                    self._set_meta(conn, key, value)
            except sqlite3.Error as exc:
                raise OutboxError(f"cannot write to the outbox {self.path}: {exc}") from None
            return value

    @property
    def dropped_total(self) -> int:
        """Entries dropped since the outbox was created (oldest ones when full)."""
        with self._lock:
            return self._dropped

    def __len__(self) -> int:
        with self._lock:
            return self._length

    @staticmethod
    def _set_meta(conn: sqlite3.Connection, key: str, value: int) -> None:
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    # --- lifetime ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (idempotent); later calls raise :class:`OutboxError`."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> Outbox:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


@contextlib.contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` .. ``COMMIT``, rolled back when the body raises."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may already have rolled back by itself (a full disk, an I/O error).
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
