"""Table mappings of staged rollouts, device pins and per-device director revisions.

- ``rollouts``: one row per rollout: what (model, version, variants), where (target), how
  (waves, dwell, probation, gates) and where it stands (state, current wave, reason).
- ``rollout_devices``: the devices a rollout planned, each with its wave, chosen variant,
  state in the rollout, the last update event seen and what it ran before (for rollback).
- ``device_pins``: an operator's pin of a device to one model version; beats rollouts.
- ``device_revisions``: the director revision of each device (never decreases) and the
  revision last published as the ``desired`` hint: the hint outbox.

``desired_models.rollout_id`` (in :mod:`fleet_server.store.models`) says which rollout
assigned a desired model (``None``: a pin).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Boolean, ForeignKey, Index, Integer, String
from sqlalchemy.orm import Mapped, mapped_column

from fleet_server.store.models import Base, Id, Json, Ts


class RolloutRow(Base):
    __tablename__ = "rollouts"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    model: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    #: profile (or ``*``) -> variant; empty: chosen per device profile.
    variants: Mapped[dict[str, str]] = mapped_column(Json, default=dict)
    #: ``{"tags": {...}, "profile": ..., "devices": [...]}``
    target: Mapped[dict[str, Any]] = mapped_column(Json)
    #: The waves as given (``["1", "10%", "100%"]``) and as planned (device counts).
    waves: Mapped[list[str]] = mapped_column(Json)
    wave_sizes: Mapped[list[int]] = mapped_column(Json)
    dwell_s: Mapped[int] = mapped_column(Integer)
    probation_s: Mapped[int] = mapped_column(Integer)
    gates: Mapped[dict[str, Any]] = mapped_column(Json)
    auto_rollback: Mapped[bool] = mapped_column(Boolean)
    state: Mapped[str] = mapped_column(String(16))
    #: Why it is in its state (``{"code", "message"}``), e.g. the gate that paused it.
    reason: Mapped[dict[str, Any] | None] = mapped_column(Json)
    current_wave: Mapped[int] = mapped_column(Integer, default=-1)
    wave_started_at: Mapped[datetime | None] = mapped_column(Ts)
    #: How many update events of this rollout were applied (skip a tick's work when equal).
    events_seen: Mapped[int] = mapped_column(BigInteger, default=0)
    #: The highest update event id applied: a tick reads only the devices with newer ones.
    events_watermark: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    #: True once no device of an ended rollout can change state any more.
    settled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(Ts)
    created_by: Mapped[str] = mapped_column(String(128))
    updated_at: Mapped[datetime] = mapped_column(Ts)
    finished_at: Mapped[datetime | None] = mapped_column(Ts)

    __table_args__ = (Index(None, "state", "id"), Index(None, "model", "id"))


class RolloutDeviceRow(Base):
    __tablename__ = "rollout_devices"

    rollout_id: Mapped[int] = mapped_column(
        ForeignKey("rollouts.id", ondelete="CASCADE"), primary_key=True
    )
    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    wave: Mapped[int] = mapped_column(Integer)
    profile: Mapped[str | None] = mapped_column(String(128))
    variant: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[dict[str, Any] | None] = mapped_column(Json)
    #: The newest update event of this rollout from this device (any version).
    last_event: Mapped[str | None] = mapped_column(String(16))
    last_event_ts: Mapped[datetime | None] = mapped_column(Ts)
    last_event_id: Mapped[int | None] = mapped_column(BigInteger)
    #: What the device was to run before this rollout assigned it (``None``: nothing).
    prev_version: Mapped[str | None] = mapped_column(String(64))
    prev_variant: Mapped[str | None] = mapped_column(String(64))
    prev_rollout_id: Mapped[int | None] = mapped_column(BigInteger)
    assigned_at: Mapped[datetime | None] = mapped_column(Ts)
    probation_at: Mapped[datetime | None] = mapped_column(Ts)
    finished_at: Mapped[datetime | None] = mapped_column(Ts)
    #: Epoch seconds (device clock) when the new version started serving: the split
    #: point of the latency gate's before/after telemetry.
    activated_ts: Mapped[int | None] = mapped_column(BigInteger)
    #: A failure an operator waived (``resume --force``): no longer counted by gates.
    waived: Mapped[bool] = mapped_column(Boolean, default=False)

    __table_args__ = (
        Index(None, "rollout_id", "wave", "state"),
        Index(None, "device_id", "rollout_id"),
    )


class DevicePinRow(Base):
    """An operator's pin: this device runs this model version, whatever rollouts say."""

    __tablename__ = "device_pins"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    variant: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Ts)
    created_by: Mapped[str] = mapped_column(String(128))


class DeviceRevisionRow(Base):
    """The director revision of a device: bumped on every change of its assignments.

    ``published_revision`` is the last revision sent as the retained ``desired`` hint;
    rows where it lags are the hint outbox (a partial index finds them).
    """

    __tablename__ = "device_revisions"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    revision: Mapped[int] = mapped_column(BigInteger, default=0)
    published_revision: Mapped[int] = mapped_column(BigInteger, default=0)
    updated_at: Mapped[datetime] = mapped_column(Ts)


_PENDING = DeviceRevisionRow.revision > DeviceRevisionRow.published_revision
Index(
    "ix_device_revisions_hint_pending",
    DeviceRevisionRow.device_id,
    postgresql_where=_PENDING,
    sqlite_where=_PENDING,
)
