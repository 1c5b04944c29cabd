"""The device inventory: listing with filters and keyset pages, tags, enrolment, revocation."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Row, and_, delete, exists, or_, select
from sqlalchemy.orm import Session

from fleet_server.domain import (
    DesiredModel,
    Device,
    DeviceState,
    Page,
    ReportedModel,
    ReportedState,
    as_utc,
    effective_state,
    utcnow,
)
from fleet_server.errors import Conflict, NotFound
from fleet_server.store import audit
from fleet_server.store.cursor import decode, encode
from fleet_server.store.models import DesiredModelRow, DeviceModelRow, DeviceRow, DeviceTagRow


@dataclass(frozen=True)
class DeviceFilter:
    """Filters of a device list; every given condition must hold.

    ``tags`` maps a key to a value, or to ``None`` for "has this key".
    """

    tags: dict[str, str | None] = field(default_factory=dict)
    profile: str | None = None
    model: str | None = None
    model_version: str | None = None
    state: DeviceState | None = None
    revoked: bool | None = None


def _state_condition(state: DeviceState, threshold: datetime) -> ColumnElement[bool]:
    live = (ReportedState.ONLINE.value, ReportedState.DEGRADED.value)
    col, seen = DeviceRow.reported_state, DeviceRow.last_seen
    if state in (DeviceState.ONLINE, DeviceState.DEGRADED):
        return and_(col == state.value, seen >= threshold)
    if state == DeviceState.STALE:
        return and_(col.in_(live), or_(seen < threshold, seen.is_(None)))
    return col == state.value


def filter_conditions(flt: DeviceFilter, threshold: datetime) -> list[ColumnElement[bool]]:
    conds: list[ColumnElement[bool]] = []
    for key, value in sorted(flt.tags.items()):
        tag = and_(DeviceTagRow.device_id == DeviceRow.id, DeviceTagRow.key == key)
        if value is not None:
            tag = and_(tag, DeviceTagRow.value == value)
        conds.append(exists().where(tag))
    if flt.profile is not None:
        conds.append(DeviceRow.profile == flt.profile)
    if flt.model is not None or flt.model_version is not None:
        model = DeviceModelRow.device_id == DeviceRow.id
        if flt.model is not None:
            model = and_(model, DeviceModelRow.model == flt.model)
        if flt.model_version is not None:
            model = and_(model, DeviceModelRow.version == flt.model_version)
        conds.append(exists().where(model))
    if flt.state is not None:
        conds.append(_state_condition(flt.state, threshold))
    if flt.revoked is not None:
        revoked = DeviceRow.revoked_at.is_not(None)
        conds.append(revoked if flt.revoked else DeviceRow.revoked_at.is_(None))
    return conds


#: What a device listing reads (not the last status document, which can be large).
DEVICE_COLUMNS = (
    DeviceRow.id,
    DeviceRow.reported_state,
    DeviceRow.profile,
    DeviceRow.agent_version,
    DeviceRow.facts,
    DeviceRow.last_seen,
    DeviceRow.created_at,
    DeviceRow.enrolled_at,
    DeviceRow.revoked_at,
    DeviceRow.cert_serial,
)


def _opt(value: datetime | None) -> datetime | None:
    return as_utc(value) if value is not None else None


def devices_from_rows(
    session: Session, rows: Sequence[Row[Any]], now: datetime, stale_after: timedelta
) -> list[Device]:
    """Devices from ``DEVICE_COLUMNS`` rows, with their tags, reported and desired models (three
    more queries for the whole page, plain tuples: no ORM objects on the hot path)."""
    ids = [r.id for r in rows]
    tags: dict[str, dict[str, str]] = defaultdict(dict)
    models: dict[str, list[ReportedModel]] = defaultdict(list)
    desired: dict[str, list[DesiredModel]] = defaultdict(list)
    if ids:
        t, m, d = DeviceTagRow, DeviceModelRow, DesiredModelRow
        for dev, key, value in session.execute(
            select(t.device_id, t.key, t.value).where(t.device_id.in_(ids)).order_by(t.key)
        ):
            tags[dev][key] = value
        for dev, name, version, state, fmt, provider in session.execute(
            select(m.device_id, m.model, m.version, m.state, m.format, m.provider)
            .where(m.device_id.in_(ids))
            .order_by(m.model)
        ):
            models[dev].append(ReportedModel(name, version, state, fmt, provider))
        for dev, name, version, variant, revision in session.execute(
            select(d.device_id, d.model, d.version, d.variant, d.revision)
            .where(d.device_id.in_(ids))
            .order_by(d.model)
        ):
            desired[dev].append(DesiredModel(name, version, variant, revision))
    return [
        Device(
            id=r.id,
            state=effective_state(r.reported_state, r.last_seen, now, stale_after),
            reported_state=r.reported_state,
            profile=r.profile,
            agent_version=r.agent_version,
            facts=dict(r.facts or {}),
            tags=tags[r.id],
            last_seen=_opt(r.last_seen),
            created_at=as_utc(r.created_at),
            enrolled_at=_opt(r.enrolled_at),
            revoked_at=_opt(r.revoked_at),
            cert_serial=r.cert_serial,
            models=tuple(models[r.id]),
            desired=tuple(desired[r.id]),
        )
        for r in rows
    ]


def list_devices(
    session: Session,
    flt: DeviceFilter,
    *,
    stale_after: timedelta,
    limit: int = 100,
    cursor: str | None = None,
    now: datetime | None = None,
) -> Page[Device]:
    """A page of devices matching ``flt``, ordered by id (keyset pagination on the id).

    Raises:
        ValidationError: the cursor is malformed.
    """
    now = as_utc(now or utcnow())
    stmt = select(*DEVICE_COLUMNS).where(*filter_conditions(flt, now - stale_after))
    if cursor is not None:
        stmt = stmt.where(DeviceRow.id > decode(cursor))
    rows = list(session.execute(stmt.order_by(DeviceRow.id).limit(limit + 1)))
    more = len(rows) > limit
    rows = rows[:limit]
    items = devices_from_rows(session, rows, now, stale_after)
    return Page(items, encode(rows[-1].id) if more and rows else None)


def get_device(
    session: Session, device_id: str, *, stale_after: timedelta, now: datetime | None = None
) -> Device:
    """One device with its tags, reported and desired models.

    Raises:
        NotFound: no device has this id.
    """
    row = session.execute(select(*DEVICE_COLUMNS).where(DeviceRow.id == device_id)).first()
    if row is None:
        raise NotFound(f"no device {device_id!r}")
    return devices_from_rows(session, [row], as_utc(now or utcnow()), stale_after)[0]


def picture(device: Device) -> dict[str, Any]:
    """The fields of a device that the audit log records."""
    return {
        "id": device.id,
        "profile": device.profile,
        "tags": device.tags,
        "enrolled_at": device.enrolled_at,
        "revoked_at": device.revoked_at,
        "cert_serial": device.cert_serial,
    }


def set_tags(
    session: Session,
    device_id: str,
    *,
    put: dict[str, str],
    remove: list[str],
    actor: str,
    stale_after: timedelta,
) -> Device:
    """Add or change the tags in ``put`` and delete the keys in ``remove``; audited.

    Raises:
        NotFound: no device has this id.
    """
    before = get_device(session, device_id, stale_after=stale_after)
    if remove:
        session.execute(
            delete(DeviceTagRow).where(
                DeviceTagRow.device_id == device_id, DeviceTagRow.key.in_(remove)
            )
        )
    for key, value in put.items():
        session.merge(DeviceTagRow(device_id=device_id, key=key, value=value))
    session.flush()
    session.expire_all()
    after = get_device(session, device_id, stale_after=stale_after)
    audit.record(
        session,
        actor=actor,
        action="device.tag",
        target_type="device",
        target_id=device_id,
        before={"tags": before.tags},
        after={"tags": after.tags},
    )
    return after


def revoke_device(
    session: Session, device_id: str, *, actor: str, stale_after: timedelta
) -> Device:
    """Mark a device revoked (its messages are dropped from then on); audited, idempotent.

    Raises:
        NotFound: no device has this id.
    """
    row = session.get(DeviceRow, device_id)
    if row is None:
        raise NotFound(f"no device {device_id!r}")
    before = get_device(session, device_id, stale_after=stale_after)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    after = get_device(session, device_id, stale_after=stale_after)
    audit.record(
        session,
        actor=actor,
        action="device.revoke",
        target_type="device",
        target_id=device_id,
        before=picture(before),
        after=picture(after),
    )
    return after


def check_enrollable(session: Session, device_id: str) -> None:
    """Check that ``device_id`` may enrol: unknown, auto-registered, or revoked.

    Raises:
        Conflict: an enrolled, unrevoked device already has this id (``device_exists``).
    """
    row = session.get(DeviceRow, device_id)
    if row is not None and row.enrolled_at is not None and row.revoked_at is None:
        raise Conflict(f"device {device_id!r} is already enrolled", code="device_exists")


def enrol_device(
    session: Session,
    *,
    device_id: str,
    facts: dict[str, Any],
    tags: dict[str, str],
    cert_serial: str | None,
    actor: str,
    stale_after: timedelta,
) -> Device:
    """Create (or take over an auto-registered or revoked) inventory row for an enrolling
    device, with its hardware facts and the enrolment token's tags; audited.

    Raises:
        Conflict: an enrolled, unrevoked device already has this id (``device_exists``).
    """
    now = utcnow()
    row = session.get(DeviceRow, device_id, with_for_update=True)
    before = None
    if row is None:
        row = DeviceRow(id=device_id, reported_state="unknown", facts={}, created_at=now)
        session.add(row)
    else:
        check_enrollable(session, device_id)
        before = picture(get_device(session, device_id, stale_after=stale_after))
    row.facts = dict(facts)
    row.enrolled_at = now
    row.revoked_at = None
    row.cert_serial = cert_serial
    profile = facts.get("profile")
    if isinstance(profile, str) and row.profile is None:
        row.profile = profile[:128]
    version = facts.get("agent_version")
    if isinstance(version, str) and row.agent_version is None:
        row.agent_version = version[:64]
    session.flush()
    for key, value in tags.items():
        session.merge(DeviceTagRow(device_id=device_id, key=key, value=value))
    session.flush()
    device = get_device(session, device_id, stale_after=stale_after)
    audit.record(
        session,
        actor=actor,
        action="device.enrol",
        target_type="device",
        target_id=device_id,
        before=before,
        after=picture(device),
    )
    return device
