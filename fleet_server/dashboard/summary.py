"""Fleet-wide aggregates for the overview: device counts by state, profile and model
version, recent update failures, and active rollouts with their progress.

Each is one grouped query (no device is loaded): at 10,000 devices the whole overview
costs a few tens of milliseconds on SQLite.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select
from sqlalchemy.orm import Session

from fleet_server.domain import DeviceState, as_utc, effective_state
from fleet_server.rollouts.domain import ACTIVE, FAILURES, OPEN, RolloutView, WaveProgress
from fleet_server.rollouts.domain import DeviceState as RolloutDeviceState
from fleet_server.store import rollouts
from fleet_server.store.models import DeviceModelRow, DeviceRow, UpdateEventRow
from fleet_server.store.rollout_models import RolloutRow

#: The order states are shown in.
STATES = (
    DeviceState.ONLINE,
    DeviceState.DEGRADED,
    DeviceState.STALE,
    DeviceState.OFFLINE,
    DeviceState.UNKNOWN,
)
FAILED_EVENTS = ("failed", "rolled_back")


@dataclass(frozen=True)
class Count:
    """A labelled count, with its share of a total (0..100)."""

    label: str
    count: int
    percent: float
    model: str | None = None
    version: str | None = None


def state_counts(session: Session, now: datetime, stale_after: timedelta) -> dict[DeviceState, int]:
    """Unrevoked devices by their shown state (``stale`` computed as the API does)."""
    fresh = case((DeviceRow.last_seen >= now - stale_after, 1), else_=0)
    stmt = (
        select(DeviceRow.reported_state, fresh, func.count())
        .where(DeviceRow.revoked_at.is_(None))
        .group_by(DeviceRow.reported_state, fresh)
    )
    out = dict.fromkeys(STATES, 0)
    for reported, is_fresh, n in session.execute(stmt):
        state = effective_state(reported, now if is_fresh else None, now, stale_after)
        out[state] += int(n)
    return out


def _shares(rows: list[tuple[str, int]], total: int) -> list[Count]:
    return [Count(label, n, 100.0 * n / total if total else 0.0) for label, n in rows]


def by_profile(session: Session, *, limit: int = 12) -> list[Count]:
    """Unrevoked devices per profile, largest first (``None`` shown as "not reported")."""
    n = func.count().label("n")
    stmt = (
        select(DeviceRow.profile, n)
        .where(DeviceRow.revoked_at.is_(None))
        .group_by(DeviceRow.profile)
        .order_by(n.desc(), DeviceRow.profile)
    )
    rows = [(p or "", int(c)) for p, c in session.execute(stmt)]
    total = sum(c for _, c in rows)
    return _shares(rows[:limit], total)


def by_model_version(session: Session, *, limit: int = 20) -> list[Count]:
    """Devices per reported (model, version), largest first."""
    m = DeviceModelRow
    n = func.count().label("n")
    stmt = (
        select(m.model, m.version, n)
        .group_by(m.model, m.version)
        .order_by(n.desc(), m.model, m.version)
        .limit(limit)
    )
    rows = list(session.execute(stmt))
    totals: dict[str, int] = {}
    for model, total in session.execute(select(m.model, func.count()).group_by(m.model)):
        totals[model] = int(total)
    return [
        Count(
            f"{model} {version}",
            int(c),
            100.0 * int(c) / totals.get(model, 1),
            model=model,
            version=version,
        )
        for model, version, c in rows
    ]


@dataclass(frozen=True)
class UpdateRecord:
    """One update event a device reported (failures carry their reason)."""

    device_id: str
    model: str
    to_version: str | None
    state: str
    ts: datetime
    rollout_id: str | None
    code: str | None
    message: str | None


def _update_record(row: UpdateEventRow) -> UpdateRecord:
    reason: dict[str, Any] = row.reason or {}
    return UpdateRecord(
        device_id=row.device_id,
        model=row.model,
        to_version=row.to_version,
        state=row.state,
        ts=as_utc(row.ts),
        rollout_id=row.rollout_id,
        code=str(reason["code"]) if reason.get("code") else None,
        message=str(reason["message"]) if reason.get("message") else None,
    )


def recent_failures(session: Session, *, limit: int = 10) -> list[UpdateRecord]:
    """The newest failed or rolled-back updates, newest first."""
    e = UpdateEventRow
    stmt = select(e).where(e.state.in_(FAILED_EVENTS)).order_by(e.id.desc()).limit(limit)
    return [_update_record(r) for r in session.scalars(stmt)]


def device_updates(session: Session, device_id: str, *, limit: int = 50) -> list[UpdateRecord]:
    """A device's update events, newest first (failures carry their reason)."""
    e = UpdateEventRow
    stmt = select(e).where(e.device_id == device_id).order_by(e.id.desc()).limit(limit)
    return [_update_record(r) for r in session.scalars(stmt)]


@dataclass(frozen=True)
class RolloutSummary:
    """A rollout with its waves' progress and its devices counted by state."""

    rollout: RolloutView
    waves: list[WaveProgress]
    totals: dict[RolloutDeviceState, int]

    @property
    def planned(self) -> int:
        """Devices planned into waves (skipped ones are not)."""
        return sum(self.rollout.wave_sizes)

    @property
    def done(self) -> int:
        """Planned devices with a final answer."""
        return sum(w.done for w in self.waves)

    @property
    def failed(self) -> int:
        return sum(self.totals.get(s, 0) for s in FAILURES)

    @property
    def in_flight(self) -> int:
        """Assigned devices without a verdict yet."""
        return sum(self.totals.get(s, 0) for s in OPEN if s is not RolloutDeviceState.PENDING)

    @property
    def percent(self) -> float:
        return 100.0 * self.done / self.planned if self.planned else 0.0


def summaries(session: Session, views: list[RolloutView]) -> list[RolloutSummary]:
    """Progress of each rollout (one grouped query each, plus one for all totals)."""
    totals = rollouts.totals(session, [r.id for r in views])
    return [RolloutSummary(r, rollouts.progress(session, r), totals[r.id]) for r in views]


def active_rollouts(session: Session, *, limit: int = 10) -> list[RolloutSummary]:
    """Running, paused and rolling-back rollouts, newest first, with their progress."""
    stmt = (
        select(RolloutRow)
        .where(RolloutRow.state.in_([s.value for s in ACTIVE]))
        .order_by(RolloutRow.id.desc())
        .limit(limit)
    )
    return summaries(session, [rollouts.view(r) for r in session.scalars(stmt)])
