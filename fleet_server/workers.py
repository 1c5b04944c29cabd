"""Several server processes on one host: ``edge-fleet serve --workers N``.

uvicorn starts N worker processes sharing the listening socket; each builds the app from
the settings the parent put in ``EDGE_FLEET_SERVE_SETTINGS`` (JSON) after applying the
migrations once. The background work (the MQTT ingest, the rollout engine, retention and
signing upkeep) runs in **one** process per data dir: the one holding an exclusive
``flock`` on ``{data_dir}/background.lock``. The others answer HTTP only and try the lock
every ``retry_s``, so when the holder dies (uvicorn restarts it) another takes over within
seconds. Replicas on other hosts, with their own data dirs and a shared PostgreSQL, each
run their own background work, which the engine's row locks and the shared MQTT
subscriptions make safe.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from fleet_server.config import ServerSettings

log = logging.getLogger("fleet_server.workers")

SETTINGS_ENV = "EDGE_FLEET_SERVE_SETTINGS"
LOG_LEVEL_ENV = "EDGE_FLEET_LOG_LEVEL"


class BackgroundLease:
    """An exclusive, non-blocking ``flock`` on a file; released when the process dies."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; True when this process holds it.

        Raises:
            OSError: the lock file cannot be created.
        """
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return True

    def release(self) -> None:
        """Give the lease up (closing the file drops the lock)."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class LeasedRunner:
    """Runs ``start`` once this process holds the lease (now, or when the holder dies),
    and ``stop`` on shutdown if it ran."""

    def __init__(
        self,
        lease: BackgroundLease,
        start: Callable[[], None],
        stop: Callable[[], None],
        *,
        retry_s: float = 2.0,
    ) -> None:
        self.lease = lease
        self._start, self._stop_work = start, stop
        self._retry_s = retry_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._running = False
        self._thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        """True when this process runs the background work."""
        return self._running

    def start(self) -> None:
        """Start the work now if the lease is free, else wait for it in a thread.

        Raises:
            OSError: the lock file cannot be created.
        """
        if self._take():
            return
        log.info("background work runs in another process (%s): HTTP only here", self.lease.path)
        self._thread = threading.Thread(target=self._wait, name="fleet-lease", daemon=True)
        self._thread.start()

    def _take(self) -> bool:
        with self._lock:
            if self._stop.is_set() or not self.lease.try_acquire():
                return False
            self._start()
            self._running = True
            return True

    def _wait(self) -> None:
        while not self._stop.wait(self._retry_s):
            try:
                if self._take():
                    log.info("took over the background work")
                    return
            except OSError as exc:
                log.warning("background lease: %s", exc)

    def stop(self) -> None:
        """Stop waiting; stop the work if this process ran it, then give the lease up."""
        self._stop.set()
        with self._lock:
            if self._running:
                self._stop_work()
                self._running = False
            self.lease.release()
        if self._thread is not None:
            self._thread.join(timeout=5)


def settings_from_env() -> ServerSettings:
    """The settings ``edge-fleet serve --workers`` handed to its workers.

    Raises:
        KeyError: the variable is not set (not started by ``serve --workers``).
        pydantic.ValidationError: the JSON is not valid settings.
    """
    return ServerSettings.model_validate_json(os.environ[SETTINGS_ENV])
