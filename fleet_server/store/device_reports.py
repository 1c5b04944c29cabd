"""Apply a batch of what devices reported over MQTT (status, telemetry, update events) in
one transaction, with executemany inserts: the write side of the ingest.

The device id of every report was taken from the MQTT topic by the caller, never from the
payload. Rules applied here:

- An unknown device is registered on the fly when ``auto_register`` (the broker authorised
  its topic); otherwise its reports are dropped and counted. Reports of revoked devices
  are dropped and counted.
- Statuses apply in the order they arrived (the broker keeps one topic's order for a
  subscriber), not by their ``ts``: the Last Will is composed when the agent connects,
  so its ``ts`` is older than the online status that follows it. Only a *retained*
  status replayed at (re)subscription is ignored when it is older than the stored one.
  A status without ``models`` (the Last Will) keeps the models reported before.
- ``last_seen`` moves forward only. A retained status, replayed by the broker when the
  server subscribes, counts as seen at its own ``ts``, not at the time it was replayed.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fleet_server.domain import ReportedModel, as_utc
from fleet_server.store.models import (
    DeviceModelRow,
    DeviceRow,
    ModelPointRow,
    TelemetryPointRow,
    UpdateEventRow,
    table_of,
)

_DEVICES = table_of(DeviceRow)
_DEVICE_MODELS = table_of(DeviceModelRow)


@dataclass(frozen=True)
class StatusReport:
    device_id: str
    received_at: datetime
    ts: datetime
    state: str
    retained: bool = False
    agent_version: str | None = None
    profile: str | None = None
    #: ``None`` when the document has no ``models`` (keep the previous ones).
    models: tuple[ReportedModel, ...] | None = None
    doc: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSample:
    name: str
    requests: int
    errors: int
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    queue_depth: float | None = None


@dataclass(frozen=True)
class TelemetryReport:
    device_id: str
    received_at: datetime
    ts: int  # epoch seconds
    seq: int | None
    system: dict[str, float | None]
    models: tuple[ModelSample, ...] = ()


@dataclass(frozen=True)
class UpdateReport:
    device_id: str
    received_at: datetime
    ts: datetime
    model: str
    state: str
    rollout_id: str | None = None
    from_version: str | None = None
    to_version: str | None = None
    reason: dict[str, Any] | None = None


Report = StatusReport | TelemetryReport | UpdateReport

SYSTEM_FIELDS = (
    "cpu_percent",
    "mem_used_bytes",
    "mem_total_bytes",
    "agent_rss_bytes",
    "disk_free_bytes",
    "temperature_c",
)


@dataclass
class BatchResult:
    statuses: int = 0
    stale_statuses: int = 0
    telemetry: int = 0
    model_points: int = 0
    update_events: int = 0
    registered: int = 0
    dropped_unknown: int = 0
    dropped_revoked: int = 0


def _insert_ignore(session: Session, rows: list[dict[str, Any]]) -> None:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        stmt: Any = postgresql.insert(_DEVICES).on_conflict_do_nothing()
    elif dialect == "sqlite":
        stmt = sqlite.insert(_DEVICES).on_conflict_do_nothing()
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        raise RuntimeError(f"unsupported dialect {dialect}")
    session.execute(stmt, rows)


def _upsert_models(session: Session, rows: list[dict[str, Any]]) -> None:
    dialect = session.get_bind().dialect.name
    mod: Any = postgresql if dialect == "postgresql" else sqlite
    stmt = mod.insert(_DEVICE_MODELS)
    stmt = stmt.on_conflict_do_update(
        index_elements=["device_id", "model"],
        set_={c: stmt.excluded[c] for c in ("version", "state", "format", "provider")},
    )
    session.execute(stmt, rows)


def _admit(
    session: Session, reports: Sequence[Report], auto_register: bool, result: BatchResult
) -> tuple[list[Report], dict[str, datetime | None]]:
    """Drop reports of revoked (and, without auto-register, unknown) devices; register the
    rest. Returns the admitted reports and each device's stored status ts."""
    ids = sorted({r.device_id for r in reports})
    known: dict[str, tuple[datetime | None, datetime | None]] = {}
    stmt = select(DeviceRow.id, DeviceRow.revoked_at, DeviceRow.status_ts)
    for chunk_start in range(0, len(ids), 1000):
        chunk = ids[chunk_start : chunk_start + 1000]
        for dev_id, revoked_at, stored in session.execute(stmt.where(DeviceRow.id.in_(chunk))):
            known[dev_id] = (revoked_at, stored)
    unknown = [i for i in ids if i not in known]
    if unknown and auto_register:
        now = max(r.received_at for r in reports)
        rows = [
            {"id": i, "reported_state": "unknown", "facts": {}, "created_at": now} for i in unknown
        ]
        _insert_ignore(session, rows)
        result.registered += len(unknown)
        known.update({i: (None, None) for i in unknown})
    admitted: list[Report] = []
    for report in reports:
        entry = known.get(report.device_id)
        if entry is None:
            result.dropped_unknown += 1
        elif entry[0] is not None:
            result.dropped_revoked += 1
        else:
            admitted.append(report)
    status_ts = {k: (as_utc(v[1]) if v[1] is not None else None) for k, v in known.items()}
    return admitted, status_ts


def _apply_statuses(
    session: Session,
    statuses: list[StatusReport],
    stored_ts: dict[str, datetime | None],
    result: BatchResult,
) -> None:
    """Write the last status of each device: one executemany UPDATE per set of fields,
    then the reported models (delete the devices' old rows, upsert the new ones)."""
    latest: dict[str, StatusReport] = {}
    for s in statuses:  # the last to arrive, per device
        latest[s.device_id] = s
    updates: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    replaced: list[str] = []
    models: list[dict[str, Any]] = []
    for dev_id in sorted(latest):
        s = latest[dev_id]
        prev = stored_ts.get(dev_id)
        if s.retained and prev is not None and s.ts < prev:
            result.stale_statuses += 1
            continue
        values: dict[str, Any] = {"reported_state": s.state, "status": s.doc, "status_ts": s.ts}
        if s.agent_version is not None:
            values["agent_version"] = s.agent_version
        if s.profile is not None:
            values["profile"] = s.profile
        updates.setdefault(tuple(sorted(values)), []).append({"b_id": dev_id, **values})
        if s.models is not None:
            replaced.append(dev_id)
            models += [
                {
                    "device_id": dev_id,
                    "model": m.name,
                    "version": m.version,
                    "state": m.state,
                    "format": m.format,
                    "provider": m.provider,
                }
                for m in s.models
            ]
        result.statuses += 1
    for fields, params in updates.items():
        stmt = (
            update(_DEVICES)
            .where(_DEVICES.c.id == bindparam("b_id"))
            .values({f: bindparam(f) for f in fields})
        )
        session.execute(stmt, params)
    for i in range(0, len(replaced), 1000):
        chunk = replaced[i : i + 1000]
        session.execute(delete(_DEVICE_MODELS).where(_DEVICE_MODELS.c.device_id.in_(chunk)))
    if models:
        _upsert_models(session, models)


def _touch_last_seen(session: Session, reports: list[Report]) -> None:
    """Move ``last_seen`` forward. Live messages of one batch arrived within one flush
    interval, so they share one timestamp (the latest) and one UPDATE per 1000 devices;
    retained statuses (seen at their own ``ts``) are updated one by one."""
    live: set[str] = set()
    latest: datetime | None = None
    replayed: dict[str, datetime] = {}
    for r in reports:
        if isinstance(r, StatusReport) and r.retained:
            t = min(r.ts, r.received_at)
            if r.device_id not in replayed or t > replayed[r.device_id]:
                replayed[r.device_id] = t
        else:
            live.add(r.device_id)
            latest = r.received_at if latest is None else max(latest, r.received_at)
    col = _DEVICES.c.last_seen
    if latest is not None:
        ids = sorted(live)
        for i in range(0, len(ids), 1000):
            session.execute(
                update(_DEVICES)
                .where(_DEVICES.c.id.in_(ids[i : i + 1000]))
                .where(col.is_(None) | (col < latest))
                .values(last_seen=latest)
            )
    if replayed:
        stmt = (
            update(_DEVICES)
            .where(_DEVICES.c.id == bindparam("b_id"))
            .where(col.is_(None) | (col < bindparam("b_seen")))
            .values(last_seen=bindparam("b_seen"))
        )
        session.execute(stmt, [{"b_id": k, "b_seen": replayed[k]} for k in sorted(replayed)])


def apply_batch(
    session: Session, reports: Sequence[Report], *, auto_register: bool = True
) -> BatchResult:
    """Write a batch of reports in the caller's transaction. Returns what was done.

    Raises:
        sqlalchemy errors, untranslated: the caller retries the whole batch.
    """
    result = BatchResult()
    if not reports:
        return result
    admitted, stored_ts = _admit(session, reports, auto_register, result)
    statuses = [r for r in admitted if isinstance(r, StatusReport)]
    if statuses:
        _apply_statuses(session, statuses, stored_ts, result)
    points: list[dict[str, Any]] = []
    model_points: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    for r in admitted:
        if isinstance(r, TelemetryReport):
            point: dict[str, Any] = {"device_id": r.device_id, "ts": r.ts, "seq": r.seq}
            point.update({k: r.system.get(k) for k in SYSTEM_FIELDS})
            points.append(point)
            model_points.extend(
                {
                    "device_id": r.device_id,
                    "model": m.name,
                    "ts": r.ts,
                    "requests": m.requests,
                    "errors": m.errors,
                    "p50_ms": m.p50_ms,
                    "p95_ms": m.p95_ms,
                    "p99_ms": m.p99_ms,
                    "queue_depth": m.queue_depth,
                }
                for m in r.models
            )
        elif isinstance(r, UpdateReport):
            events.append(
                {
                    "device_id": r.device_id,
                    "ts": r.ts,
                    "received_at": r.received_at,
                    "rollout_id": r.rollout_id,
                    "model": r.model,
                    "from_version": r.from_version,
                    "to_version": r.to_version,
                    "state": r.state,
                    "reason": r.reason,
                }
            )
    if points:
        session.execute(insert(table_of(TelemetryPointRow)), points)
    if model_points:
        session.execute(insert(table_of(ModelPointRow)), model_points)
    if events:
        session.execute(insert(table_of(UpdateEventRow)), events)
    result.telemetry, result.model_points, result.update_events = (
        len(points),
        len(model_points),
        len(events),
    )
    _touch_last_seen(session, admitted)
    return result
