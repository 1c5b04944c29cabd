"""What each device must run: desired models, pins, and the director revision.

Every change of a device's desired models goes through :func:`set_desired`, which bumps
the device's revision in ``device_revisions`` (it never decreases, even when a desired
model is removed), so the director's metadata versions always grow. The revision row is
also the device's lock: writers take it first (``SELECT ... FOR UPDATE`` on PostgreSQL;
SQLite write transactions are serialised anyway), so a rollout and an operator's pin never
interleave their read-check-write on one device.

The director routes read a device's assignments with :func:`desired_of_device` and its
revision with :func:`device_revision`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from fleet_server.domain import as_utc
from fleet_server.store.models import DesiredModelRow, DeviceModelRow, table_of
from fleet_server.store.rollout_models import DevicePinRow, DeviceRevisionRow

_REVISIONS = table_of(DeviceRevisionRow)
_DESIRED = table_of(DesiredModelRow)


@dataclass(frozen=True)
class Desired:
    """One model version a device must run, and the rollout that said so (``None``: a pin)."""

    version: str
    variant: str
    rollout_id: int | None = None


@dataclass(frozen=True)
class DesiredEntry:
    """A desired model of a device, as the director needs it."""

    model: str
    version: str
    variant: str
    rollout_id: int | None
    revision: int


@dataclass(frozen=True)
class Pin:
    """An operator's pin of a device to one model version."""

    device_id: str
    model: str
    version: str
    variant: str
    created_at: datetime
    created_by: str


def lock_device(session: Session, device_id: str, now: datetime) -> int:
    """Create the device's revision row if needed, lock it for this transaction
    (PostgreSQL) and return its revision.

    Raises:
        sqlalchemy.exc.IntegrityError: no such device (translated by ``Database.write``).
    """
    dialect = session.get_bind().dialect.name
    mod: Any = postgresql if dialect == "postgresql" else sqlite
    row = {"device_id": device_id, "revision": 0, "published_revision": 0, "updated_at": now}
    session.execute(mod.insert(_REVISIONS).values(row).on_conflict_do_nothing())
    stmt = select(DeviceRevisionRow.revision).where(DeviceRevisionRow.device_id == device_id)
    return int(session.execute(stmt.with_for_update()).scalar_one())


def _dialect(session: Session) -> Any:
    return postgresql if session.get_bind().dialect.name == "postgresql" else sqlite


def lock_devices(session: Session, device_ids: list[str], now: datetime) -> dict[str, int]:
    """:func:`lock_device` for many devices at once (locked in id order), their revisions.

    Raises:
        sqlalchemy.exc.IntegrityError: a device does not exist.
    """
    ids = sorted(set(device_ids))
    if not ids:
        return {}
    rows = [
        {"device_id": d, "revision": 0, "published_revision": 0, "updated_at": now} for d in ids
    ]
    session.execute(_dialect(session).insert(_REVISIONS).on_conflict_do_nothing(), rows)
    r = DeviceRevisionRow
    stmt = select(r.device_id, r.revision).where(r.device_id.in_(ids)).order_by(r.device_id)
    return {d: int(v) for d, v in session.execute(stmt.with_for_update())}


def desired_for(session: Session, device_ids: list[str], model: str) -> dict[str, Desired]:
    """The desired version of ``model`` of each device that has one."""
    d = DesiredModelRow
    stmt = select(d.device_id, d.version, d.variant, d.rollout_id).where(
        d.model == model, d.device_id.in_(device_ids)
    )
    return {dev: Desired(v, var, ro) for dev, v, var, ro in session.execute(stmt)}


def pins_for(session: Session, device_ids: list[str], model: str) -> dict[str, Pin]:
    """The pin of ``model`` of each device that has one."""
    stmt = select(DevicePinRow).where(
        DevicePinRow.model == model, DevicePinRow.device_id.in_(device_ids)
    )
    return {row.device_id: _pin(row) for row in session.scalars(stmt)}


def reported_versions(session: Session, device_ids: list[str], model: str) -> dict[str, str]:
    """The version of ``model`` each device last said it runs (devices that said one)."""
    m = DeviceModelRow
    stmt = select(m.device_id, m.version).where(m.model == model, m.device_id.in_(device_ids))
    return {dev: v for dev, v in session.execute(stmt) if v is not None}


def set_desired_many(
    session: Session,
    model: str,
    desired: dict[str, Desired],
    revisions: dict[str, int],
    now: datetime,
) -> dict[str, int]:
    """:func:`set_desired` of ``model`` for many devices, in three statements; the caller
    holds their locks (:func:`lock_devices`, whose result is ``revisions``). Returns each
    device's new revision.

    Raises:
        KeyError: a device of ``desired`` was not locked.
        sqlalchemy errors: the caller's ``Database.write`` translates them.
    """
    if not desired:
        return {}
    new = {d: revisions[d] + 1 for d in sorted(desired)}
    session.execute(
        update(_REVISIONS)
        .where(_REVISIONS.c.device_id == bindparam("dev"))
        .values(revision=bindparam("rev"), updated_at=bindparam("now")),
        [{"dev": d, "rev": rev, "now": now} for d, rev in new.items()],
    )
    rows = [
        {
            "device_id": d,
            "model": model,
            "version": want.version,
            "variant": want.variant,
            "rollout_id": want.rollout_id,
            "revision": new[d],
            "updated_at": now,
        }
        for d, want in sorted(desired.items())
    ]
    ins = _dialect(session).insert(_DESIRED)
    session.execute(
        ins.on_conflict_do_update(
            index_elements=[_DESIRED.c.device_id, _DESIRED.c.model],
            set_={
                k: ins.excluded[k]
                for k in ("version", "variant", "rollout_id", "revision", "updated_at")
            },
        ),
        rows,
    )
    return new


def device_revision(session: Session, device_id: str) -> int:
    """The device's director revision (0 when nothing was ever assigned to it)."""
    stmt = select(DeviceRevisionRow.revision).where(DeviceRevisionRow.device_id == device_id)
    value = session.execute(stmt).scalar_one_or_none()
    return int(value) if value is not None else 0


def desired_of(session: Session, device_id: str, model: str) -> Desired | None:
    """The desired version of ``model`` on the device, or ``None``."""
    row = session.get(DesiredModelRow, (device_id, model))
    if row is None:
        return None
    return Desired(row.version, row.variant, row.rollout_id)


def desired_of_device(session: Session, device_id: str) -> list[DesiredEntry]:
    """Every desired model of the device (what its director metadata must name)."""
    d = DesiredModelRow
    rows = session.execute(
        select(d.model, d.version, d.variant, d.rollout_id, d.revision)
        .where(d.device_id == device_id)
        .order_by(d.model)
    )
    return [DesiredEntry(*r) for r in rows]


def set_desired(
    session: Session, device_id: str, model: str, desired: Desired | None, now: datetime
) -> int:
    """Make ``desired`` what the device must run for ``model`` (``None``: nothing), bump
    the device's revision and return it. Takes the device's lock.

    Raises:
        sqlalchemy errors: the caller's ``Database.write`` translates them.
    """
    revision = lock_device(session, device_id, now) + 1
    session.execute(
        update(_REVISIONS)
        .where(_REVISIONS.c.device_id == device_id)
        .values(revision=revision, updated_at=now)
    )
    row = session.get(DesiredModelRow, (device_id, model))
    if desired is None:
        if row is not None:
            session.delete(row)
    elif row is None:
        session.add(
            DesiredModelRow(
                device_id=device_id,
                model=model,
                version=desired.version,
                variant=desired.variant,
                rollout_id=desired.rollout_id,
                revision=revision,
                updated_at=now,
            )
        )
    else:
        row.version, row.variant, row.rollout_id = (
            desired.version,
            desired.variant,
            desired.rollout_id,
        )
        row.revision, row.updated_at = revision, now
    session.flush()
    return revision


def reported_version(session: Session, device_id: str, model: str) -> str | None:
    """The version of ``model`` the device last said it runs, or ``None``."""
    row = session.get(DeviceModelRow, (device_id, model))
    return row.version if row is not None else None


def _pin(row: DevicePinRow) -> Pin:
    return Pin(
        row.device_id,
        row.model,
        row.version,
        row.variant,
        as_utc(row.created_at),
        row.created_by,
    )


def pin_of(session: Session, device_id: str, model: str) -> Pin | None:
    """The device's pin for ``model``, or ``None``."""
    row = session.get(DevicePinRow, (device_id, model))
    return _pin(row) if row is not None else None


def pins_of(session: Session, device_id: str) -> list[Pin]:
    """Every pin of the device, by model."""
    stmt = select(DevicePinRow).where(DevicePinRow.device_id == device_id)
    return [_pin(r) for r in session.scalars(stmt.order_by(DevicePinRow.model))]


def put_pin(session: Session, pin: Pin) -> None:
    """Create or replace the pin (the caller holds the device's lock)."""
    session.merge(
        DevicePinRow(
            device_id=pin.device_id,
            model=pin.model,
            version=pin.version,
            variant=pin.variant,
            created_at=pin.created_at,
            created_by=pin.created_by,
        )
    )
    session.flush()


def delete_pin(session: Session, device_id: str, model: str) -> bool:
    """Remove the pin; ``False`` when there was none."""
    result = session.execute(
        delete(DevicePinRow).where(DevicePinRow.device_id == device_id, DevicePinRow.model == model)
    )
    return bool(getattr(result, "rowcount", 0))


# --- the hint outbox ------------------------------------------------------------------


def pending_hints(session: Session, limit: int) -> list[tuple[str, int]]:
    """``(device, revision)`` whose revision was not published yet, locked for this
    transaction (PostgreSQL: rows another replica is publishing are skipped)."""
    r = DeviceRevisionRow
    stmt = (
        select(r.device_id, r.revision)
        .where(r.revision > r.published_revision)
        .order_by(r.device_id)
        .limit(limit)
        .with_for_update(skip_locked=True)
    )
    return [(d, int(rev)) for d, rev in session.execute(stmt)]


def mark_published(session: Session, sent: list[tuple[str, int]]) -> None:
    """Record that these revisions were published (never moves backwards)."""
    for device_id, revision in sent:
        session.execute(
            update(_REVISIONS)
            .where(
                _REVISIONS.c.device_id == device_id,
                _REVISIONS.c.published_revision < revision,
            )
            .values(published_revision=revision)
        )
