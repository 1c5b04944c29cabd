"""The simulator's counters, its one-line live summary, and the JSON stats file."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


def _short(n: float) -> str:
    """``1234`` -> ``1.2k``."""
    if n >= 1_000_000:
        return f"{n / 1_000_000:.1f}M"
    if n >= 10_000:
        return f"{n / 1000:.0f}k"
    if n >= 1000:
        return f"{n / 1000:.1f}k"
    return f"{n:.0f}"


@dataclass
class Stats:
    """Counters since the start (mutated on the event loop only)."""

    devices: int = 0
    online: int = 0
    #: Devices that connected at least once.
    started: int = 0
    telemetry: int = 0
    #: Messages kept while a device was offline, sent when it came back.
    buffered: int = 0
    statuses: int = 0
    drops: int = 0
    reconnects: int = 0
    #: Connections lost without the simulator asking (a broker restart).
    lost: int = 0
    publish_failed: int = 0
    checks: int = 0
    check_errors: Counter[str] = field(default_factory=Counter)
    #: Update events sent, by state.
    events: Counter[str] = field(default_factory=Counter)
    updating: int = 0
    enrolled: int = 0
    http_requests: int = 0
    http_errors: int = 0
    started_at: float = field(default_factory=time.monotonic)

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready copy of the counters."""
        data = {k: v for k, v in self.__dict__.items() if k != "started_at"}
        data["check_errors"] = dict(self.check_errors)
        data["events"] = dict(self.events)
        data["elapsed_s"] = round(time.monotonic() - self.started_at, 3)
        return data

    def line(self, previous: Stats | None = None, span_s: float = 1.0) -> str:
        """The live summary: one short line."""
        t = int(time.monotonic() - self.started_at)
        rate = ""
        if previous is not None and span_s > 0:
            rate = f" ({(self.telemetry - previous.telemetry) / span_s:.0f}/s)"
        ev = self.events
        errors = sum(self.check_errors.values())
        return (
            f"[{t // 3600:02d}:{t // 60 % 60:02d}:{t % 60:02d}] "
            f"{self.online}/{self.devices} online | telemetry {_short(self.telemetry)}{rate} | "
            f"checks {_short(self.checks)} ({errors} refused) | updating {self.updating}, "
            f"committed {ev['committed']}, failed {ev['failed']}, "
            f"rolled back {ev['rolled_back']} | http {_short(self.http_requests)} "
            f"({self.http_errors} err) | drops {self.drops}, lost {self.lost}"
        )

    def snapshot(self) -> Stats:
        """A copy, to compute rates against later."""
        copy = Stats(**{k: v for k, v in self.__dict__.items()})
        copy.check_errors, copy.events = Counter(self.check_errors), Counter(self.events)
        return copy

    def write(self, path: Path) -> None:
        """Replace ``path`` with the counters as JSON (atomically).

        Raises:
            OSError: the folder cannot be written.
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        with os.fdopen(fd, "w") as f:
            json.dump(self.as_dict(), f)
        os.replace(tmp, path)
