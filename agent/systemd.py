"""Talking to systemd: readiness, status and the watchdog (``sd_notify``), stdlib only.

The unit (``systemd/edge-agent.service``) is ``Type=notify`` with ``WatchdogSec=30``.
systemd passes the notification socket in ``NOTIFY_SOCKET`` and the watchdog timeout in
``WATCHDOG_USEC``; outside systemd neither is set and everything here is a no-op::

    notifier = Notifier.from_env()
    watchdog = Watchdog(notifier, watchdog_interval(), [stuck_worker_check("face", ...)])
    notifier.ready("serving 2 models")
    while running:
        ...                     # one iteration of the daemon's main loop
        watchdog.tick()         # pings only while every check says healthy
    notifier.stopping()

There is deliberately no ping thread: the ping comes from the main loop, and only when
every health check passes, so a stuck inference worker makes systemd restart the agent
instead of being hidden by a thread that keeps pinging.

``python -m agent.systemd memory-dropin --profile NAME`` prints the ``MemoryMax=`` drop-in
that ``scripts/install-agent`` installs for a device profile.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agent.profiles.schema import Memory, Profile

log = logging.getLogger(__name__)

#: A health check for the watchdog: ``None`` when healthy, else why not (one line).
Check = Callable[[], str | None]

#: Longest ``STATUS=`` text sent; systemd takes one datagram of at most 4 KiB.
_MAX_STATUS_CHARS = 1024


# --- sd_notify -----------------------------------------------------------------------


def _socket_address(value: str) -> str | None:
    """The ``sendto`` address for ``NOTIFY_SOCKET``: a path, or ``@name`` (abstract)."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _one_line(text: str) -> str:
    """``text`` fit for one ``KEY=value`` field (newlines separate fields)."""
    flat = " ".join(text.splitlines())
    return flat[:_MAX_STATUS_CHARS]


class Notifier:
    """Sends ``sd_notify`` messages to systemd; a no-op when there is no socket.

    Sending never raises: a failure is logged once as a warning (then at debug level),
    because a lost notification must not take the agent down. Safe to use from several
    threads.
    """

    def __init__(self, address: str | None) -> None:
        """``address``: a socket path, or an abstract name starting with NUL; ``None``
        makes every method a no-op."""
        self._address = address
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failed = False
        self._status: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        """The notifier for ``$NOTIFY_SOCKET`` (``os.environ`` unless ``environ`` is given).

        Unset or empty: a disabled notifier. A socket kind this module does not speak
        (``vsock:...``) is logged and gives a disabled notifier too. Never raises.
        """
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET", "")
        if not value:
            return cls(None)
        address = _socket_address(value)
        if address is None:
            log.warning("NOTIFY_SOCKET=%r is not a unix socket; not notifying systemd", value)
        return cls(address)

    @property
    def enabled(self) -> bool:
        """Whether messages go anywhere (the agent runs under systemd)."""
        return self._address is not None

    @property
    def last_status(self) -> str | None:
        """The last text given to :meth:`status` (or :meth:`ready`/:meth:`stopping`)."""
        return self._status

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=value`` fields; True when it was sent.

        Never raises: with no socket it does nothing (False); a send error is logged
        once and gives False.
        """
        if self._address is None or not fields:
            return False
        payload = "\n".join(fields).encode()
        with self._lock:
            try:
                if self._sock is None:
                    self._sock = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                self._sock.sendto(payload, self._address)
            except OSError as exc:
                level = logging.DEBUG if self._failed else logging.WARNING
                log.log(level, "cannot notify systemd (%s): %s", self._readable(), exc)
                self._failed = True
                return False
        return True

    def _readable(self) -> str:
        address = self._address or ""
        return "@" + address[1:] if address.startswith("\0") else address

    def ready(self, status: str | None = None) -> bool:
        """``READY=1``: start-up (or a reload) is complete; with a ``STATUS=`` line."""
        return self.send("READY=1", *self._status_fields(status))

    def status(self, text: str, *, remember: bool = True) -> bool:
        """``STATUS=text``, shown by ``systemctl status``. An empty text clears it.

        ``remember=False`` sends a temporary status (the watchdog's "unhealthy" reason)
        that :attr:`last_status` does not take over.
        """
        return self.send(*self._status_fields(text, remember=remember))

    def stopping(self, status: str | None = None) -> bool:
        """``STOPPING=1``: the agent has begun to shut down."""
        return self.send("STOPPING=1", *self._status_fields(status))

    def reloading(self, status: str | None = None) -> bool:
        """``RELOADING=1`` with ``MONOTONIC_USEC`` (systemd needs it for
        ``Type=notify-reload``); send :meth:`ready` when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status_fields(status))

    def watchdog(self) -> bool:
        """``WATCHDOG=1``: one keep-alive ping. Use :class:`Watchdog` rather than this."""
        return self.send("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """``EXTEND_TIMEOUT_USEC``: ask systemd for ``seconds`` more from now to finish
        the current start-up or shutdown (e.g. while a TensorRT engine is being built).

        Raises:
            ValueError: ``seconds`` is not positive.
        """
        if not seconds > 0:
            raise ValueError(f"extend_timeout needs a positive duration, got {seconds}")
        return self.send(f"EXTEND_TIMEOUT_USEC={round(seconds * 1_000_000)}")

    def _status_fields(self, text: str | None, *, remember: bool = True) -> tuple[str, ...]:
        if text is None:
            return ()
        line = _one_line(text)
        if remember:
            self._status = line
        return (f"STATUS={line}",)

    def close(self) -> None:
        """Close the socket (the notifier reopens it if used again)."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


# --- the watchdog ----------------------------------------------------------------------


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings: half of ``$WATCHDOG_USEC``, as systemd advises.

    ``None`` when the watchdog is off: ``WATCHDOG_USEC`` unset, not a positive integer
    (logged), or ``WATCHDOG_PID`` set to a process other than this one (the variables
    were inherited from a parent). Never raises.
    """
    env = os.environ if environ is None else environ
    raw_usec = env.get("WATCHDOG_USEC", "")
    if not raw_usec:
        return None
    raw_pid = env.get("WATCHDOG_PID", "")
    if raw_pid:
        try:
            pid = int(raw_pid)
        except ValueError:
            log.warning("ignoring the watchdog: WATCHDOG_PID=%r is not a number", raw_pid)
            return None
        if pid != os.getpid():
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("ignoring the watchdog: WATCHDOG_USEC=%r is not a positive number", raw_usec)
        return None
    return usec / 2 / 1_000_000


class Watchdog:
    """Pings systemd's watchdog from the daemon's main loop, only while it is healthy.

    Call :meth:`tick` on every iteration of the main loop (at least every
    ``interval_s``; :meth:`seconds_until_due` is a good wait timeout). Each tick runs
    every check; when all say healthy (``None``) it sends ``WATCHDOG=1`` if the last
    ping is ``interval_s`` old. When a check reports a reason, pings stop, the reason
    is logged once and shown as ``STATUS=``, so ``systemctl status`` says why systemd
    restarted the agent. Should the agent recover before ``WatchdogSec`` runs out,
    pings resume and the daemon's own status comes back.

    With ``interval_s=None`` (no watchdog) checks still run and still set the status.
    """

    def __init__(
        self,
        notifier: Notifier,
        interval_s: float | None,
        checks: Iterable[Check] = (),
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``interval_s=None``: no pings (systemd is not watching), checks still run.

        Raises:
            ValueError: ``interval_s`` is given but not positive.
        """
        if interval_s is not None and not interval_s > 0:
            raise ValueError(f"watchdog interval must be positive, got {interval_s}")
        self._notifier = notifier
        self._interval = interval_s
        self._checks = list(checks)
        self._clock = clock
        self._last_ping: float | None = None
        self._reason: str | None = None
        self._broken_checks: set[int] = set()

    @property
    def interval_s(self) -> float | None:
        """Seconds between pings; ``None`` when systemd does not watch the agent."""
        return self._interval

    @property
    def reason(self) -> str | None:
        """Why the agent is unhealthy as of the last tick; ``None`` when it is healthy."""
        return self._reason

    def add_check(self, check: Check) -> None:
        """Also require ``check`` to pass before each ping (e.g. for a model loaded later)."""
        self._checks.append(check)

    def tick(self) -> str | None:
        """Run the checks and ping if healthy and due; returns the unhealthy reason or None.

        Never raises: a check that raises counts as unhealthy (it cannot vouch for the
        agent), with the exception as the reason.
        """
        reason = self._evaluate()
        if reason is not None:
            if self._reason is None:
                log.error("watchdog: unhealthy, no longer pinging systemd: %s", reason)
            if reason != self._reason:
                self._notifier.status(f"unhealthy: {reason}", remember=False)
            self._reason = reason
            return reason
        if self._reason is not None:
            log.warning("watchdog: healthy again, pinging systemd")
            self._reason = None
            self._notifier.status(self._notifier.last_status or "", remember=False)
        if self._interval is not None:
            now = self._clock()
            if self._last_ping is None or now - self._last_ping >= self._interval:
                self._notifier.watchdog()
                self._last_ping = now
        return None

    def seconds_until_due(self) -> float | None:
        """Seconds until the next ping is due (0 when overdue); ``None`` without a watchdog."""
        if self._interval is None:
            return None
        if self._last_ping is None:
            return 0.0
        return max(0.0, self._last_ping + self._interval - self._clock())

    def _evaluate(self) -> str | None:
        reasons = []
        for index, check in enumerate(self._checks):
            try:
                reason = check()
            except Exception as exc:
                if index not in self._broken_checks:
                    log.exception("watchdog: health check %r failed", check)
                    self._broken_checks.add(index)
                reason = f"health check failed: {type(exc).__name__}: {exc}"
            else:
                self._broken_checks.discard(index)
            if reason is not None:
                reasons.append(_one_line(reason))
        return "; ".join(reasons) if reasons else None


def stuck_worker_check(
    model: str,
    busy_since: Callable[[], float | None],
    max_s: float,
    *,
    clock: Callable[[], float] = time.monotonic,
) -> Check:
    """A check that fails while the worker of ``model`` has spent over ``max_s`` on one job.

    ``busy_since`` returns when the worker's current job started (same clock as
    ``clock``, ``time.monotonic`` by default) or ``None`` when it is idle. The reason
    reads ``worker for model face stuck for 31 s``.

    Raises:
        ValueError: ``max_s`` is not positive.
    """
    if not max_s > 0:
        raise ValueError(f"max_s must be positive, got {max_s}")

    def check() -> str | None:
        started = busy_since()
        if started is None:
            return None
        elapsed = clock() - started
        if elapsed <= max_s:
            return None
        return f"worker for model {model} stuck for {elapsed:.0f} s"

    check.__name__ = check.__qualname__ = f"stuck_worker_check[{model}]"
    return check


# --- the memory limit of the unit --------------------------------------------------------


def memory_max(memory: Memory, total_bytes: int | None) -> str | None:
    """The ``MemoryMax=`` value for a profile's ``memory`` section; ``None``: no limit.

    A fraction alone becomes a percentage (``50%``), which systemd applies to the RAM
    of the machine the unit runs on; ``limit_mib`` alone becomes ``512M``. With both,
    the smaller for ``total_bytes`` of RAM, in bytes (``limit_mib`` when it is unknown).
    """
    fraction, mib = memory.limit_fraction, memory.limit_mib
    if fraction is None:
        return None if mib is None else f"{mib}M"
    percent = fraction * 100
    if mib is None and (total_bytes is None or abs(percent - round(percent)) < 1e-9):
        return f"{max(1, round(percent))}%"
    if total_bytes is None:
        return f"{mib}M"
    return str(memory.limit_bytes(total_bytes))


def memory_dropin(profile: Profile, total_bytes: int | None) -> str | None:
    """The text of ``edge-agent.service.d/memory.conf`` for ``profile``; ``None``: no limit."""
    value = memory_max(profile.memory, total_bytes)
    if value is None:
        return None
    limits = profile.memory.model_dump(exclude_none=True, include={"limit_mib", "limit_fraction"})
    described = ", ".join(f"{k} {v}" for k, v in limits.items())
    return (
        f"# Written by scripts/install-agent from device profile {profile.name!r}\n"
        f"# (memory: {described}). Re-run the installer to change it.\n"
        "[Service]\n"
        f"MemoryMax={value}\n"
    )


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m agent.systemd memory-dropin --profile NAME [--total-bytes N]``.

    Prints the drop-in, or nothing when the profile sets no memory limit. An unknown or
    invalid profile prints ``error: <code>: <message>`` and returns 2.
    """
    from agent.errors import EdgeError
    from agent.profiles import load_profile

    parser = argparse.ArgumentParser(prog="python -m agent.systemd")
    sub = parser.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("memory-dropin", help="print the MemoryMax= drop-in for a profile")
    sp.add_argument("--profile", required=True, help="profile name or YAML file")
    sp.add_argument(
        "--total-bytes", type=int, help="RAM to size the limit for (default: this machine)"
    )
    args = parser.parse_args(argv)
    try:
        profile = load_profile(args.profile)
    except EdgeError as exc:
        print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
        return 2
    total = args.total_bytes if args.total_bytes is not None else _physical_memory()
    text = memory_dropin(profile, total)
    if text is not None:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
