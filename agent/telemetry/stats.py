"""Per-model request counters and latency histograms, shared by the workers and telemetry.

Worker threads call :meth:`ModelStats.record_ok` and :meth:`ModelStats.record_error`;
the MQTT thread calls ``record_error("overloaded")``. Both are cheap (one lock, a few
increments). The telemetry tick calls :meth:`ModelStats.take_interval` for the
interval's percentiles; Prometheus reads :meth:`ModelStats.snapshot` at scrape time.

Stats are kept by model name in :class:`AgentStats`, so they survive a model's hot
swap: ``requests`` and ``errors`` count since the agent started, whatever the version.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass

from agent.errors import PROTOCOL_ERROR_CODES
from agent.protocol.documents import LatencyMs
from agent.telemetry.histogram import HistogramSnapshot, LatencyHistogram

#: The percentiles the telemetry document carries.
TELEMETRY_PERCENTILES = (50.0, 95.0, 99.0)


def _error_code(code: str) -> str:
    """``code`` when it is a protocol error code, else ``internal`` (bounded label set)."""
    return code if code in PROTOCOL_ERROR_CODES else "internal"


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """One consistent reading of a model's counters since start.

    ``latency`` holds the latencies of the successful requests (errors carry none).
    """

    requests_total: int
    errors_total: Mapping[str, int]
    latency: HistogramSnapshot


class ModelStats:
    """Counters of one model since the agent started, and the current interval's latencies."""

    def __init__(self, name: str) -> None:
        self.name = name
        # Guards what the interval's swap touches; record_ok does not take it.
        self._lock = threading.Lock()
        self._interval = LatencyHistogram()
        self._taken = HistogramSnapshot.empty()
        self._errors: dict[str, int] = {}

    def record_ok(self, latency_ms: float) -> None:
        """Count one request answered with outputs, ``latency_ms`` after it was received."""
        self._interval.record(latency_ms)

    def record_error(self, code: str) -> None:
        """Count one request answered with the error ``code``.

        A code that is not one of the protocol's error codes counts as ``internal``.
        """
        code = _error_code(code)
        with self._lock:
            self._errors[code] = self._errors.get(code, 0) + 1

    @property
    def requests_total(self) -> int:
        """Every request answered since start, with outputs or with an error."""
        return self.snapshot().requests_total

    @property
    def errors_total(self) -> dict[str, int]:
        """Requests answered with an error since start, by protocol error code."""
        with self._lock:
            return dict(self._errors)

    def snapshot(self) -> StatsSnapshot:
        """The counters and the latency histogram since start, read consistently."""
        with self._lock:
            latency = self._taken.merge(self._interval.snapshot())
            errors = dict(self._errors)
        return StatsSnapshot(latency.count + sum(errors.values()), errors, latency)

    def take_interval(self) -> LatencyMs | None:
        """The p50, p95 and p99 of the latencies recorded since the last call, then start anew.

        Returns ``None`` when no request succeeded in the interval (the telemetry's
        ``latency_ms: null``). Values are milliseconds, rounded to the microsecond.
        """
        with self._lock:
            interval = self._interval.swap()
            self._taken = self._taken.merge(interval)
        if interval.count == 0:
            return None
        p50, p95, p99 = (
            None if v is None else round(v, 3) for v in interval.percentiles(TELEMETRY_PERCENTILES)
        )
        return LatencyMs(p50=p50, p95=p95, p99=p99)


class AgentStats:
    """The :class:`ModelStats` of every model, by name, for the agent's whole life.

    Requests that reach no model (an unknown model name, a payload refused before it
    was routed) are counted apart with :meth:`record_unrouted`, so that names sent by
    clients never create entries here.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: dict[str, ModelStats] = {}
        self._unrouted: dict[str, int] = {}
        self._replies_dropped = 0

    def model(self, name: str) -> ModelStats:
        """The stats of model ``name``, created empty on first use."""
        with self._lock:
            stats = self._models.get(name)
            if stats is None:
                stats = self._models[name] = ModelStats(name)
            return stats

    def get(self, name: str) -> ModelStats | None:
        """The stats of model ``name``, or ``None`` when it never had any."""
        with self._lock:
            return self._models.get(name)

    def all(self) -> dict[str, ModelStats]:
        """Every model's stats, by name (a copy of the registry)."""
        with self._lock:
            return dict(self._models)

    def record_unrouted(self, code: str) -> None:
        """Count a request answered with error ``code`` that was routed to no model."""
        code = _error_code(code)
        with self._lock:
            self._unrouted[code] = self._unrouted.get(code, 0) + 1

    def record_reply_dropped(self) -> None:
        """Count a reply the transport could not take (its outgoing queue was full)."""
        with self._lock:
            self._replies_dropped += 1

    @property
    def replies_dropped(self) -> int:
        """Replies dropped since start because the transport's outgoing queue was full."""
        return self._replies_dropped

    @property
    def unrouted_errors(self) -> dict[str, int]:
        """Errors of requests routed to no model, since start, by code."""
        with self._lock:
            return dict(self._unrouted)
