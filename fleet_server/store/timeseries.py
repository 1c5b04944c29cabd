"""Time-series reads (per device, per model) and retention with downsampling.

Retention, run by :func:`downsample` every few minutes: raw points older than
``raw_retention`` become 1-minute aggregates, 1-minute aggregates older than
``minute_retention`` become 5-minute aggregates, and 5-minute aggregates older than
``five_minute_retention`` are deleted. Gauges are averaged; request/error counters keep
the bucket's last (largest) cumulative value; latencies keep the bucket's worst p95/p99.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import Select, and_, case, delete, func, insert, literal, select, text
from sqlalchemy.orm import Session

from fleet_server.store.models import ModelPointRow, TelemetryPointRow

_PG_LOCK_KEY = 0x6564_6766  # one advisory lock key for downsampling
#: Model-series queries look this far before ``since`` so the first bucket has a base
#: counter value to subtract from.
_LOOKBACK_S = 600


@dataclass(frozen=True)
class SystemPoint:
    ts: int
    cpu_percent: float | None
    mem_used_bytes: float | None
    mem_total_bytes: float | None
    agent_rss_bytes: float | None
    disk_free_bytes: float | None
    temperature_c: float | None
    samples: int


@dataclass(frozen=True)
class ModelPoint:
    ts: int
    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    queue_depth: float | None
    devices: int


def device_series(
    session: Session, device_id: str, *, since: int, until: int, step: int
) -> list[SystemPoint]:
    """System metrics of one device in ``[since, until)`` (epoch seconds), one point per
    ``step`` seconds (averages; ``temperature_c`` and memory are averaged too)."""
    t = TelemetryPointRow
    bucket = (t.ts // step) * step
    stmt = (
        select(
            bucket.label("b"),
            func.avg(t.cpu_percent),
            func.avg(t.mem_used_bytes),
            func.max(t.mem_total_bytes),
            func.avg(t.agent_rss_bytes),
            func.min(t.disk_free_bytes),
            func.avg(t.temperature_c),
            func.sum(t.samples),
        )
        .where(t.device_id == device_id, t.ts >= since, t.ts < until)
        .group_by(bucket)
        .order_by(bucket)
    )
    return [
        SystemPoint(
            ts=int(b),
            cpu_percent=_f(cpu),
            mem_used_bytes=_f(mem),
            mem_total_bytes=_f(total),
            agent_rss_bytes=_f(rss),
            disk_free_bytes=_f(disk),
            temperature_c=_f(temp),
            samples=int(n or 0),
        )
        for b, cpu, mem, total, rss, disk, temp, n in session.execute(stmt)
    ]


def _f(value: Any) -> float | None:
    return float(value) if value is not None else None


def _delta(col: Any, prev: Any) -> Any:
    """Counter increase since the previous point; a drop means the agent restarted."""
    return case((prev.is_(None), 0), (col >= prev, col - prev), else_=col)


def _lag(col: Any) -> Any:
    """The previous value of ``col`` for the same device (by time)."""
    m = ModelPointRow
    return func.lag(col).over(partition_by=m.device_id, order_by=(m.ts, m.id))


def model_series(
    session: Session,
    model: str,
    *,
    since: int,
    until: int,
    step: int,
    device_id: str | None = None,
) -> list[ModelPoint]:
    """Serving metrics of ``model`` in ``[since, until)``, one point per ``step`` seconds:
    requests and errors are increases summed over devices; p50 is averaged, p95/p99 are
    the worst of any device; ``devices`` counts the devices that reported."""
    m = ModelPointRow
    conds = [m.model == model, m.ts >= since - _LOOKBACK_S, m.ts < until]
    if device_id is not None:
        conds.append(m.device_id == device_id)
    inner = (
        select(
            m.device_id,
            m.ts,
            m.requests,
            m.errors,
            m.p50_ms,
            m.p95_ms,
            m.p99_ms,
            m.queue_depth,
            _lag(m.requests).label("prev_req"),
            _lag(m.errors).label("prev_err"),
        )
        .where(and_(*conds))
        .subquery()
    )
    bucket = (inner.c.ts // step) * step
    stmt: Select[Any] = (
        select(
            bucket.label("b"),
            func.sum(_delta(inner.c.requests, inner.c.prev_req)),
            func.sum(_delta(inner.c.errors, inner.c.prev_err)),
            func.avg(inner.c.p50_ms),
            func.max(inner.c.p95_ms),
            func.max(inner.c.p99_ms),
            func.avg(inner.c.queue_depth),
            func.count(func.distinct(inner.c.device_id)),
        )
        .where(inner.c.ts >= since)
        .group_by(bucket)
        .order_by(bucket)
    )
    return [
        ModelPoint(
            ts=int(b),
            requests=int(req or 0),
            errors=int(err or 0),
            p50_ms=_f(p50),
            p95_ms=_f(p95),
            p99_ms=_f(p99),
            queue_depth=_f(qd),
            devices=int(n),
        )
        for b, req, err, p50, p95, p99, qd, n in session.execute(stmt)
    ]


@dataclass
class RetentionResult:
    aggregated: int = 0
    deleted: int = 0
    skipped: bool = False


def _rollup(session: Session, row: Any, src: int, dst: int, cutoff: int) -> tuple[int, int]:
    """Aggregate ``row`` points of resolution ``src`` older than ``cutoff`` into buckets
    of ``dst`` seconds; delete the originals. Returns (rows aggregated, rows deleted)."""
    bucket = (row.ts // dst) * dst
    old = and_(row.resolution == src, row.ts < cutoff)
    if row is TelemetryPointRow:
        keys = ["device_id"]
        cols: list[Any] = [row.device_id]
        fields = ["cpu_percent", "mem_used_bytes", "mem_total_bytes", "agent_rss_bytes"]
        fields += ["disk_free_bytes", "temperature_c"]
        aggs = [func.avg(getattr(row, f)) for f in fields]
    else:
        keys = ["device_id", "model"]
        cols = [row.device_id, row.model]
        fields = ["requests", "errors", "p50_ms", "p95_ms", "p99_ms", "queue_depth"]
        aggs = [
            func.max(row.requests),
            func.max(row.errors),
            func.avg(row.p50_ms),
            func.max(row.p95_ms),
            func.max(row.p99_ms),
            func.avg(row.queue_depth),
        ]
    source = (
        select(*cols, bucket, literal(dst), func.sum(row.samples), *aggs)
        .where(old)
        .group_by(*cols, bucket)
    )
    target = [*keys, "ts", "resolution", "samples", *fields]
    made = session.execute(insert(row).from_select(target, source)).rowcount  # type: ignore[attr-defined]
    gone = session.execute(delete(row).where(old)).rowcount  # type: ignore[attr-defined]
    return int(made or 0), int(gone or 0)


def downsample(
    session: Session,
    *,
    now: int,
    raw_retention: timedelta,
    minute_retention: timedelta,
    five_minute_retention: timedelta,
) -> RetentionResult:
    """Apply the retention policy (see the module docstring) in the caller's transaction.

    On PostgreSQL it runs only if no other replica is running it (advisory lock).
    """
    result = RetentionResult()
    if session.get_bind().dialect.name == "postgresql":
        got = session.scalar(text("SELECT pg_try_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
        if not got:
            result.skipped = True
            return result
    raw_cut = (now - int(raw_retention.total_seconds())) // 60 * 60
    min_cut = (now - int(minute_retention.total_seconds())) // 300 * 300
    end_cut = now - int(five_minute_retention.total_seconds())
    for row in (TelemetryPointRow, ModelPointRow):
        for src, dst, cut in ((0, 60, raw_cut), (60, 300, min_cut)):
            made, gone = _rollup(session, row, src, dst, cut)
            result.aggregated += made
            result.deleted += gone
        gone = session.execute(delete(row).where(row.resolution == 300, row.ts < end_cut)).rowcount  # type: ignore[attr-defined]
        result.deleted += int(gone or 0)
    return result
