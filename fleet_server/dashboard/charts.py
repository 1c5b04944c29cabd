"""The device page's telemetry charts as data: one chart per metric, each with its axis
titles and units, series over a chosen window with gaps left as gaps.

The page embeds the result as JSON; ``app.js`` draws it with plotly.js (served from the
installed ``plotly`` package). Times are UTC.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.api.params import window
from fleet_server.domain import as_utc
from fleet_server.store import timeseries
from fleet_server.store.models import ModelPointRow

#: The windows offered, in seconds, by their label.
WINDOWS: dict[str, int] = {"15m": 900, "1h": 3600, "6h": 21_600, "24h": 86_400, "7d": 604_800}
DEFAULT_WINDOW = "1h"
_MIB = 1024 * 1024


@dataclass
class Series:
    """One line of a chart; a ``None`` marks a gap (no data for a while)."""

    name: str
    x: list[str] = field(default_factory=list)
    y: list[float | None] = field(default_factory=list)


@dataclass
class Chart:
    """One chart: what it shows, in which unit, and its lines."""

    key: str
    title: str
    y_title: str
    unit: str
    series: list[Series] = field(default_factory=list)


@dataclass
class ChartSet:
    """Every chart of a device over one window."""

    since: str
    until: str
    step_s: int
    charts: list[Chart]

    def to_json(self) -> dict[str, Any]:
        """The JSON the page embeds."""
        return asdict(self)


def _iso(ts: int) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _line(name: str, points: list[tuple[int, float | None]], gap_s: float) -> Series:
    """A series from ``(ts, value)`` points; a gap wider than ``gap_s`` breaks the line."""
    line = Series(name)
    prev: int | None = None
    for ts, value in points:
        if value is None:
            continue
        if prev is not None and ts - prev > gap_s:
            line.x.append(_iso((ts + prev) // 2))
            line.y.append(None)
        line.x.append(_iso(ts))
        line.y.append(round(value, 2))
        prev = ts
    return line


def _mib(value: float | None) -> float | None:
    return value / _MIB if value is not None else None


def device_charts(
    session: Session, device_id: str, *, label: str, now: datetime, interval_s: float
) -> ChartSet:
    """CPU, memory, temperature, and per model p95 latency and error rate, of one device
    over the window ``label`` (a key of :data:`WINDOWS`) ending ``now``. Lines break
    where no point came for three steps or three telemetry intervals (``interval_s``)."""
    span = WINDOWS.get(label, WINDOWS[DEFAULT_WINDOW])
    until = as_utc(now)
    w = window(datetime.fromtimestamp(until.timestamp() - span, UTC), until, None)
    start = w.since // w.step * w.step
    gap = 3 * max(w.step, interval_s)
    system = timeseries.device_series(session, device_id, since=start, until=w.until, step=w.step)
    charts = [
        Chart(
            "cpu",
            "CPU",
            "CPU (%)",
            "%",
            [_line("CPU", [(p.ts, p.cpu_percent) for p in system], gap)],
        ),
        Chart(
            "memory",
            "Memory",
            "Memory (MiB)",
            "MiB",
            [
                _line("used", [(p.ts, _mib(p.mem_used_bytes)) for p in system], gap),
                _line("total", [(p.ts, _mib(p.mem_total_bytes)) for p in system], gap),
                _line("agent RSS", [(p.ts, _mib(p.agent_rss_bytes)) for p in system], gap),
            ],
        ),
        Chart(
            "temperature",
            "Temperature",
            "Temperature (°C)",
            "°C",
            [_line("SoC", [(p.ts, p.temperature_c) for p in system], gap)],
        ),
    ]
    latency = Chart("latency", "p95 latency per model", "p95 latency (ms)", "ms")
    errors = Chart("errors", "Error rate per model", "Errors (% of requests)", "%")
    for model in _models_in(session, device_id, start, w.until):
        points = timeseries.model_series(
            session, model, since=start, until=w.until, step=w.step, device_id=device_id
        )
        latency.series.append(_line(model, [(p.ts, p.p95_ms) for p in points], gap))
        rates = [(p.ts, 100.0 * p.errors / p.requests if p.requests else None) for p in points]
        errors.series.append(_line(model, rates, gap))
    charts += [latency, errors]
    return ChartSet(_iso(start), _iso(w.until), w.step, charts)


def _models_in(session: Session, device_id: str, since: int, until: int) -> list[str]:
    m = ModelPointRow
    stmt = (
        select(m.model)
        .where(m.device_id == device_id, m.ts >= since, m.ts < until)
        .distinct()
        .order_by(m.model)
    )
    return [str(name) for name in session.scalars(stmt)]
