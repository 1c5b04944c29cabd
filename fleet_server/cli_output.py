"""What the CLI prints: aligned tables, key/value blocks, durations and ages, a progress bar."""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, TextIO

from fleet_server.domain import as_utc, utcnow

_DURATION_RE = re.compile(r"^(\d+)\s*([smhdw])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str) -> timedelta:
    """``30s``, ``15m``, ``1h``, ``7d``, ``2w`` as a timedelta.

    Raises:
        ValueError: not a positive number followed by one of s m h d w.
    """
    m = _DURATION_RE.match(text.strip().lower())
    if m is None or int(m[1]) == 0:
        raise ValueError(f"{text!r} is not a duration like 30m, 1h or 7d")
    return timedelta(seconds=int(m[1]) * _UNITS[m[2]])


def age(value: str | None, now: datetime | None = None) -> str:
    """A timestamp as a short age (``12s ago``, ``3h ago``); ``-`` for none."""
    if not value:
        return "-"
    try:
        when = as_utc(datetime.fromisoformat(value))
    except ValueError:
        return value
    seconds = int(((now or utcnow()) - when).total_seconds())
    future = seconds < 0
    seconds = abs(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            text = f"{seconds // size}{unit}"
            break
    else:
        text = f"{seconds}s"
    return f"in {text}" if future else f"{text} ago"


def cell(value: Any) -> str:
    """One table cell: ``-`` for empty, ``k=v,...`` for a dict, ``a,b`` for a list."""
    if value is None or value in ("", {}, []):
        return "-"
    if isinstance(value, datetime):
        return as_utc(value).isoformat(timespec="seconds")
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], out: TextIO | None = None) -> None:
    """Print rows under upper-case headers, columns aligned."""
    out = out or sys.stdout
    text_rows = [[cell(v) for v in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    line = "  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True))
    print(line.rstrip(), file=out)
    for row in text_rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def block(pairs: Sequence[tuple[str, Any]], out: TextIO | None = None) -> None:
    """Print ``key: value`` lines, keys aligned."""
    out = out or sys.stdout
    width = max((len(k) for k, _ in pairs), default=0)
    for key, value in pairs:
        print(f"{key + ':':<{width + 1}} {cell(value)}", file=out)


def dump_json(data: Any, out: TextIO | None = None) -> None:
    """Print ``data`` as indented JSON (``--json``)."""
    out = out or sys.stdout
    print(json.dumps(data, indent=2, sort_keys=True, default=str), file=out)


class Progress:
    """A one-line byte progress bar on stderr (only when stderr is a terminal, unless forced)."""

    def __init__(
        self, total: int, label: str, *, out: TextIO | None = None, force: bool = False
    ) -> None:
        out = out or sys.stderr
        self.total, self.label, self.out = max(total, 1), label, out
        self.enabled = force or out.isatty()
        self.done = 0
        self._last = 0.0
        self._start = time.monotonic()

    def advance(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and (now - self._last > 0.1 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        bar = "#" * int(frac * 30)
        rate = self.done / max(now - self._start, 1e-6) / 1e6
        self.out.write(f"\r{self.label} [{bar:<30}] {frac:5.1%} {rate:6.1f} MB/s")
        self.out.flush()

    def finish(self, message: str = "") -> None:
        if self.enabled:
            self.out.write("\r" + " " * 79 + "\r")
            if message:
                self.out.write(message + "\n")
            self.out.flush()
