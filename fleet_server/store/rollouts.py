"""Rollouts in the database: create, lock, read, list, and the per-wave progress.

Locking: whoever changes a rollout (the engine's tick, an operator's action) first locks
its row with :func:`lock_rollout` in the same write transaction. On PostgreSQL that is
``SELECT ... FOR UPDATE`` (the engine adds ``SKIP LOCKED``, so a replica moves on to other
rollouts instead of waiting); on SQLite every write transaction already holds the
database's write lock (``BEGIN IMMEDIATE``). Either way the lock is released when the
transaction ends, also when its process dies, and every decision is taken on state read
under the lock: two engines can never both advance the same wave.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, or_, select
from sqlalchemy.orm import Session

from fleet_server.domain import Page, as_utc
from fleet_server.errors import NotFound
from fleet_server.rollouts.domain import (
    ACTIVE,
    DeviceState,
    Gates,
    Reason,
    RolloutSpec,
    RolloutState,
    RolloutView,
    Target,
    WaveProgress,
)
from fleet_server.store.cursor import decode, decode_int, encode
from fleet_server.store.models import table_of
from fleet_server.store.rollout_models import RolloutDeviceRow, RolloutRow


@dataclass(frozen=True)
class PlannedDevice:
    """A device as planned into a rollout."""

    device_id: str
    wave: int
    profile: str | None
    variant: str | None
    state: DeviceState = DeviceState.PENDING
    reason: dict[str, Any] | None = None


@dataclass(frozen=True)
class RolloutDevice:
    """One device of a rollout, as the API shows it."""

    device_id: str
    wave: int
    profile: str | None
    variant: str | None
    state: DeviceState
    reason: dict[str, Any] | None
    last_event: str | None
    last_event_ts: datetime | None
    prev_version: str | None
    assigned_at: datetime | None
    finished_at: datetime | None
    waived: bool


def _opt(value: datetime | None) -> datetime | None:
    return as_utc(value) if value is not None else None


def view(row: RolloutRow) -> RolloutView:
    """The read-only view of a rollout row."""
    return RolloutView(
        id=row.id,
        model=row.model,
        version=row.version,
        variants=dict(row.variants or {}),
        target=Target.model_validate(row.target),
        waves=list(row.waves),
        wave_sizes=list(row.wave_sizes),
        dwell_s=row.dwell_s,
        probation_s=row.probation_s,
        gates=Gates.model_validate(row.gates),
        auto_rollback=row.auto_rollback,
        state=RolloutState(row.state),
        reason=Reason.model_validate(row.reason) if row.reason else None,
        current_wave=row.current_wave,
        wave_started_at=_opt(row.wave_started_at),
        created_at=as_utc(row.created_at),
        created_by=row.created_by,
        updated_at=as_utc(row.updated_at),
        finished_at=_opt(row.finished_at),
    )


def insert_rollout(
    session: Session,
    spec: RolloutSpec,
    devices: list[PlannedDevice],
    wave_sizes: list[int],
    *,
    actor: str,
    now: datetime,
) -> RolloutRow:
    """Store a planned rollout (state ``running``, no wave started) and its devices."""
    row = RolloutRow(
        model=spec.model,
        version=spec.version,
        variants=dict(spec.variants),
        target=spec.target.model_dump(mode="json"),
        waves=list(spec.waves),
        wave_sizes=wave_sizes,
        dwell_s=spec.dwell_s,
        probation_s=spec.probation_s,
        gates=spec.gates.model_dump(mode="json"),
        auto_rollback=spec.auto_rollback,
        state=RolloutState.RUNNING.value,
        reason=None,
        current_wave=-1,
        events_seen=0,
        events_watermark=0,
        settled=False,
        created_at=now,
        created_by=actor,
        updated_at=now,
    )
    session.add(row)
    session.flush()
    rows = [
        {
            "rollout_id": row.id,
            "device_id": d.device_id,
            "wave": d.wave,
            "profile": d.profile,
            "variant": d.variant,
            "state": d.state.value,
            "reason": d.reason,
            "waived": False,
        }
        for d in devices
    ]
    for start in range(0, len(rows), 1000):
        session.execute(insert(table_of(RolloutDeviceRow)), rows[start : start + 1000])
    return row


def lock_rollout(session: Session, rollout_id: int, *, skip_locked: bool = False) -> RolloutRow:
    """The rollout's row, locked for this transaction (see the module docstring).

    Raises:
        NotFound: no such rollout, or (``skip_locked``) another transaction holds it.
    """
    stmt = select(RolloutRow).where(RolloutRow.id == rollout_id)
    row = session.scalars(
        stmt.with_for_update(skip_locked=skip_locked).execution_options(populate_existing=True)
    ).first()
    if row is None:
        raise NotFound(f"no rollout {rollout_id}" + (" (or it is locked)" if skip_locked else ""))
    return row


def get_rollout(session: Session, rollout_id: int) -> RolloutView:
    """One rollout.

    Raises:
        NotFound: no such rollout.
    """
    row = session.get(RolloutRow, rollout_id)
    if row is None:
        raise NotFound(f"no rollout {rollout_id}")
    return view(row)


def list_rollouts(
    session: Session,
    *,
    state: RolloutState | None = None,
    model: str | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page[RolloutView]:
    """Rollouts, newest first, filtered; keyset-paginated on the id.

    Raises:
        ValidationError: the cursor is malformed.
    """
    stmt = select(RolloutRow).order_by(RolloutRow.id.desc()).limit(limit + 1)
    if state is not None:
        stmt = stmt.where(RolloutRow.state == state.value)
    if model is not None:
        stmt = stmt.where(RolloutRow.model == model)
    if cursor is not None:
        stmt = stmt.where(RolloutRow.id < decode_int(cursor))
    rows = list(session.scalars(stmt))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([view(r) for r in rows], encode(rows[-1].id) if more and rows else None)


def to_reconcile(session: Session) -> list[int]:
    """Rollouts the engine must look at: active ones, and ended ones whose devices may
    still report (oldest first, so a newer rollout's takeover is seen after the older's)."""
    active = [s.value for s in ACTIVE]
    stmt = select(RolloutRow.id).where(
        or_(RolloutRow.state.in_(active), RolloutRow.settled.is_(False))
    )
    return [int(i) for i in session.scalars(stmt.order_by(RolloutRow.id))]


def counts(session: Session, rollout_id: int) -> dict[tuple[int, DeviceState, bool], int]:
    """``(wave, state, waived) -> devices`` of the rollout."""
    rd = RolloutDeviceRow
    stmt = (
        select(rd.wave, rd.state, rd.waived, func.count())
        .where(rd.rollout_id == rollout_id)
        .group_by(rd.wave, rd.state, rd.waived)
    )
    return {(w, DeviceState(s), bool(x)): int(n) for w, s, x, n in session.execute(stmt)}


def progress(session: Session, rollout: RolloutView) -> list[WaveProgress]:
    """Each planned wave with its device counts by state."""
    per: dict[int, dict[DeviceState, int]] = defaultdict(dict)
    for (wave, state, _), n in counts(session, rollout.id).items():
        per[wave][state] = per[wave].get(state, 0) + n
    return [
        WaveProgress(
            index=i, size=size, started=i <= rollout.current_wave, counts=dict(per.get(i, {}))
        )
        for i, size in enumerate(rollout.wave_sizes)
    ]


def list_devices(
    session: Session,
    rollout_id: int,
    *,
    wave: int | None = None,
    state: DeviceState | None = None,
    limit: int = 100,
    cursor: str | None = None,
) -> Page[RolloutDevice]:
    """The rollout's devices by id, filtered; keyset-paginated on the device id.

    Raises:
        ValidationError: the cursor is malformed.
    """
    rd = RolloutDeviceRow
    stmt = select(rd).where(rd.rollout_id == rollout_id).order_by(rd.device_id).limit(limit + 1)
    if wave is not None:
        stmt = stmt.where(rd.wave == wave)
    if state is not None:
        stmt = stmt.where(rd.state == state.value)
    if cursor is not None:
        stmt = stmt.where(rd.device_id > decode(cursor))
    rows = list(session.scalars(stmt))
    more = len(rows) > limit
    rows = rows[:limit]
    items = [
        RolloutDevice(
            device_id=r.device_id,
            wave=r.wave,
            profile=r.profile,
            variant=r.variant,
            state=DeviceState(r.state),
            reason=r.reason,
            last_event=r.last_event,
            last_event_ts=_opt(r.last_event_ts),
            prev_version=r.prev_version,
            assigned_at=_opt(r.assigned_at),
            finished_at=_opt(r.finished_at),
            waived=r.waived,
        )
        for r in rows
    ]
    return Page(items, encode(rows[-1].device_id) if more and rows else None)


def totals(session: Session, rollout_ids: list[int]) -> dict[int, dict[DeviceState, int]]:
    """Per rollout, its devices counted by state."""
    out: dict[int, dict[DeviceState, int]] = {i: {} for i in rollout_ids}
    if not rollout_ids:
        return out
    rd = RolloutDeviceRow
    stmt = (
        select(rd.rollout_id, rd.state, func.count())
        .where(rd.rollout_id.in_(rollout_ids))
        .group_by(rd.rollout_id, rd.state)
    )
    for rollout_id, state, n in session.execute(stmt):
        out[rollout_id][DeviceState(state)] = int(n)
    return out
