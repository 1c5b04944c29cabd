"""The device-level queries of the rollout engine: target selection, update events,
ownership of assignments, timeouts, and the telemetry the latency gate compares.

Every function runs in the caller's transaction; those that change rows expect the
rollout's lock (:func:`fleet_server.store.rollouts.lock_rollout`) to be held.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, case, exists, func, select, update
from sqlalchemy.orm import Session

from fleet_server.domain import ReportedState, as_utc
from fleet_server.rollouts.domain import HOLDING, DeviceState, Reason, Target
from fleet_server.store.models import (
    DesiredModelRow,
    DeviceRow,
    DeviceTagRow,
    ModelPointRow,
    UpdateEventRow,
)
from fleet_server.store.rollout_models import DevicePinRow, RolloutDeviceRow

_HOLDING = [s.value for s in HOLDING]


@dataclass(frozen=True)
class Candidate:
    """A device a rollout targets: its profile and whether it is online right now."""

    device_id: str
    profile: str | None
    online: bool


@dataclass(frozen=True)
class LatestEvent:
    """The newest update event of one device in one rollout."""

    id: int
    device_id: str
    ts: datetime
    received_at: datetime
    state: str
    to_version: str | None
    reason: dict[str, Any] | None


@dataclass(frozen=True)
class LostDevice:
    """A device whose desired model is no longer this rollout's."""

    device_id: str
    holder: int | None  # the rollout that now holds it (None: a pin, or nobody)
    pinned: str | None  # the pinned version, if a pin took it


def target_devices(
    session: Session, target: Target, *, now: datetime, stale_after: timedelta
) -> list[Candidate]:
    """Unrevoked devices matching every condition of ``target``, by id."""
    d = DeviceRow
    live = (ReportedState.ONLINE.value, ReportedState.DEGRADED.value)
    online = and_(d.reported_state.in_(live), d.last_seen >= now - stale_after)
    stmt = select(d.id, d.profile, case((online, True), else_=False)).where(d.revoked_at.is_(None))
    for key, value in sorted(target.tags.items()):
        t = DeviceTagRow
        stmt = stmt.where(exists().where(t.device_id == d.id, t.key == key, t.value == value))
    if target.profile is not None:
        stmt = stmt.where(d.profile == target.profile)
    if target.devices:
        stmt = stmt.where(d.id.in_(target.devices))
    return [Candidate(i, p, bool(o)) for i, p, o in session.execute(stmt.order_by(d.id))]


def event_count(session: Session, rollout_id: int) -> int:
    """How many update events name this rollout (a cheap "anything new?" check)."""
    e = UpdateEventRow
    stmt = select(func.count()).select_from(e).where(e.rollout_id == str(rollout_id))
    return int(session.execute(stmt).scalar_one())


@dataclass(frozen=True)
class EventTally:
    """One consistent look at a rollout's update events."""

    total: int  # events naming the rollout
    newest: int  # their highest id (0: none)
    above: int  # events with an id above the watermark asked about


def event_tally(session: Session, rollout_id: int, watermark: int) -> EventTally:
    """Count the rollout's events, their highest id, and those above ``watermark``, in
    one statement (one snapshot)."""
    e = UpdateEventRow
    stmt = select(
        func.count(), func.max(e.id), func.sum(case((e.id > watermark, 1), else_=0))
    ).where(e.rollout_id == str(rollout_id))
    total, newest, above = session.execute(stmt).one()
    return EventTally(int(total or 0), int(newest or 0), int(above or 0))


def devices_with_events(session: Session, rollout_id: int, after: int, upto: int) -> list[str]:
    """The devices with an event of this rollout whose id is in ``(after, upto]``."""
    e = UpdateEventRow
    stmt = (
        select(e.device_id)
        .where(e.rollout_id == str(rollout_id), e.id > after, e.id <= upto)
        .distinct()
    )
    return sorted(session.scalars(stmt))


def latest_events(
    session: Session,
    rollout_id: int,
    model: str,
    version: str | None = None,
    *,
    device_ids: list[str] | None = None,
) -> list[LatestEvent]:
    """Per device (of ``device_ids`` only, when given), the newest event of this rollout
    and model (of ``version`` only, when given), by the device's timestamp and then
    arrival: shared subscriptions may deliver one device's events to different replicas,
    out of order."""
    e = UpdateEventRow
    rank = (
        func.row_number()
        .over(partition_by=e.device_id, order_by=(e.ts.desc(), e.id.desc()))
        .label("rank")
    )
    inner = select(
        e.id, e.device_id, e.ts, e.received_at, e.state, e.to_version, e.reason, rank
    ).where(e.rollout_id == str(rollout_id), e.model == model)
    if version is not None:
        inner = inner.where(e.to_version == version)
    if device_ids is not None:
        inner = inner.where(e.device_id.in_(device_ids))
    sub = inner.subquery()
    stmt = select(
        sub.c.id,
        sub.c.device_id,
        sub.c.ts,
        sub.c.received_at,
        sub.c.state,
        sub.c.to_version,
        sub.c.reason,
    ).where(sub.c.rank == 1)
    return [
        LatestEvent(r.id, r.device_id, as_utc(r.ts), as_utc(r.received_at), *r[4:])
        for r in session.execute(stmt)
    ]


def first_serving(
    session: Session, rollout_id: int, version: str, *, device_ids: list[str] | None = None
) -> dict[str, int]:
    """Per device (of ``device_ids`` only, when given), when (epoch seconds, device
    clock) it first reported serving ``version``: its first ``probation`` or
    ``committed`` event."""
    e = UpdateEventRow
    stmt = select(e.device_id, func.min(e.ts)).where(
        e.rollout_id == str(rollout_id),
        e.to_version == version,
        e.state.in_(("probation", "committed")),
    )
    if device_ids is not None:
        stmt = stmt.where(e.device_id.in_(device_ids))
    stmt = stmt.group_by(e.device_id)
    return {dev: int(as_utc(ts).timestamp()) for dev, ts in session.execute(stmt)}


def lost_devices(session: Session, rollout_id: int, model: str) -> list[LostDevice]:
    """Devices holding this rollout's assignment whose desired model now says otherwise
    (a newer rollout took them, a pin, or the assignment was removed)."""
    rd, dm, pin = RolloutDeviceRow, DesiredModelRow, DevicePinRow
    stmt = (
        select(rd.device_id, dm.rollout_id, pin.version)
        .select_from(rd)
        .outerjoin(dm, and_(dm.device_id == rd.device_id, dm.model == model))
        .outerjoin(pin, and_(pin.device_id == rd.device_id, pin.model == model))
        .where(
            rd.rollout_id == rollout_id,
            rd.state.in_(_HOLDING),
            (dm.rollout_id.is_(None)) | (dm.rollout_id != rollout_id),
        )
    )
    return [
        LostDevice(d, int(h) if h is not None else None, p) for d, h, p in session.execute(stmt)
    ]


def stall(session: Session, rollout_id: int, *, cutoff: datetime, now: datetime) -> int:
    """Mark devices on probation since before ``cutoff`` as stalled; returns how many."""
    rd = RolloutDeviceRow
    reason = Reason.of("probation_timeout", "no verdict within the rollout's probation window")
    result = session.execute(
        update(rd)
        .where(
            rd.rollout_id == rollout_id,
            rd.state == DeviceState.PROBATION.value,
            rd.probation_at < cutoff,
        )
        .values(state=DeviceState.STALLED.value, reason=reason, finished_at=now)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def rows(
    session: Session,
    rollout_id: int,
    states: frozenset[DeviceState],
    *,
    waves: range | None = None,
    device_ids: list[str] | None = None,
    limit: int | None = None,
) -> list[RolloutDeviceRow]:
    """The rollout's device rows in ``states`` (in ``waves``, of ``device_ids``), by
    wave and device id."""
    rd = RolloutDeviceRow
    stmt = select(rd).where(rd.rollout_id == rollout_id, rd.state.in_([s.value for s in states]))
    if waves is not None:
        stmt = stmt.where(rd.wave >= waves.start, rd.wave < waves.stop)
    if device_ids is not None:
        stmt = stmt.where(rd.device_id.in_(device_ids))
    stmt = stmt.order_by(rd.wave, rd.device_id)
    if limit is not None:
        stmt = stmt.limit(limit)
    return list(session.scalars(stmt))


def count_in(
    session: Session, rollout_id: int, states: frozenset[DeviceState], wave: int | None = None
) -> int:
    """How many of the rollout's devices (of ``wave``) are in ``states``."""
    rd = RolloutDeviceRow
    stmt = (
        select(func.count())
        .select_from(rd)
        .where(rd.rollout_id == rollout_id, rd.state.in_([s.value for s in states]))
    )
    if wave is not None:
        stmt = stmt.where(rd.wave == wave)
    return int(session.execute(stmt).scalar_one())


def set_state(
    session: Session,
    rollout_id: int,
    source: frozenset[DeviceState],
    target: DeviceState,
    *,
    reason: dict[str, Any] | None,
    now: datetime,
) -> int:
    """Move every device in ``source`` to ``target``; returns how many moved."""
    rd = RolloutDeviceRow
    result = session.execute(
        update(rd)
        .where(rd.rollout_id == rollout_id, rd.state.in_([s.value for s in source]))
        .values(state=target.value, reason=reason, finished_at=now)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def waive(session: Session, rollout_id: int, states: frozenset[DeviceState]) -> int:
    """Waive the rollout's devices in ``states``: gates stop counting them."""
    rd = RolloutDeviceRow
    result = session.execute(
        update(rd)
        .where(rd.rollout_id == rollout_id, rd.state.in_([s.value for s in states]))
        .values(waived=True)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def latency_pairs(
    session: Session,
    rollout_id: int,
    model: str,
    *,
    waves: range,
    states: frozenset[DeviceState],
    window_s: int,
) -> list[tuple[str, float, float]]:
    """Per device of ``waves`` in ``states`` that started serving the new version: the
    mean p95 (ms) in the ``window_s`` before the swap and in the ``window_s`` after it.
    Devices without points on both sides are left out."""
    rd, mp = RolloutDeviceRow, ModelPointRow
    before = func.avg(case((mp.ts < rd.activated_ts, mp.p95_ms)))
    after = func.avg(case((mp.ts >= rd.activated_ts, mp.p95_ms)))
    stmt = (
        select(rd.device_id, before, after)
        .select_from(rd)
        .join(
            mp,
            and_(
                mp.device_id == rd.device_id,
                mp.model == model,
                mp.ts >= rd.activated_ts - window_s,
                mp.ts < rd.activated_ts + window_s,
            ),
        )
        .where(
            rd.rollout_id == rollout_id,
            rd.activated_ts.is_not(None),
            rd.waived.is_(False),
            rd.wave >= waves.start,
            rd.wave < waves.stop,
            rd.state.in_([s.value for s in states]),
        )
        .group_by(rd.device_id)
    )
    return [
        (dev, float(b), float(a))
        for dev, b, a in session.execute(stmt)
        if b is not None and a is not None and b > 0
    ]
