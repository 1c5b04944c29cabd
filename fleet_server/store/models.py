"""SQLAlchemy 2 table mappings. The same schema (and migrations) serve SQLite and PostgreSQL.

Choices that matter for both databases:

- Tags live in their own table ``device_tags(device_id, key, value)`` with an index on
  ``(key, value, device_id)``: a tag filter is an indexed ``EXISTS``, on SQLite and PG alike.
- Reported models live in ``device_models`` indexed on ``(model, version, device_id)``.
- Time-series timestamps are integer epoch seconds, so bucketing (``ts // 60``) is plain
  integer arithmetic on both databases.
- Surrogate keys are ``BIGINT`` on PostgreSQL and ``INTEGER`` (the rowid) on SQLite.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    String,
    Table,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

Id = BigInteger().with_variant(Integer(), "sqlite")
Json = JSON().with_variant(JSONB(), "postgresql")
Ts = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def table_of(cls: type[Base]) -> Table:
    """The Core table of a mapped class (for executemany inserts and updates)."""
    table = cls.__table__
    assert isinstance(table, Table)
    return table


class DeviceRow(Base):
    __tablename__ = "devices"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reported_state: Mapped[str] = mapped_column(String(16), default="unknown")
    profile: Mapped[str | None] = mapped_column(String(128))
    agent_version: Mapped[str | None] = mapped_column(String(64))
    facts: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    status: Mapped[dict[str, Any] | None] = mapped_column(Json)
    status_ts: Mapped[datetime | None] = mapped_column(Ts)
    last_seen: Mapped[datetime | None] = mapped_column(Ts)
    created_at: Mapped[datetime] = mapped_column(Ts)
    enrolled_at: Mapped[datetime | None] = mapped_column(Ts)
    revoked_at: Mapped[datetime | None] = mapped_column(Ts)
    cert_serial: Mapped[str | None] = mapped_column(String(128))

    # Pages are keyset-ordered by id: walking the primary key and stopping at the page
    # size is the best plan unless a filter is selective, which the (profile, id), tag and
    # model indexes serve in id order too. State filters deliberately have no index: a
    # range scan on last_seen would read every matching device and sort them all.
    __table_args__ = (Index(None, "profile", "id"),)


class DeviceTagRow(Base):
    __tablename__ = "device_tags"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(128))

    __table_args__ = (Index(None, "key", "value", "device_id"),)


class DeviceModelRow(Base):
    """A model a device reports in its status (replaced on every status)."""

    __tablename__ = "device_models"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    format: Mapped[str | None] = mapped_column(String(16))
    provider: Mapped[str | None] = mapped_column(String(64))

    __table_args__ = (Index(None, "model", "version", "device_id"),)


class DesiredModelRow(Base):
    """The model version a device should run. Written by the OTA rollout engine."""

    __tablename__ = "desired_models"

    device_id: Mapped[str] = mapped_column(
        ForeignKey("devices.id", ondelete="CASCADE"), primary_key=True
    )
    model: Mapped[str] = mapped_column(String(64), primary_key=True)
    version: Mapped[str] = mapped_column(String(64))
    variant: Mapped[str] = mapped_column(String(64))
    revision: Mapped[int] = mapped_column(Integer, default=0)
    updated_at: Mapped[datetime] = mapped_column(Ts)
    #: The rollout that assigned it (``None``: a pin, or a version a rollback restored
    #: that no rollout had assigned).
    rollout_id: Mapped[int | None] = mapped_column(BigInteger)


class ReleaseRow(Base):
    __tablename__ = "model_releases"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(64))
    version: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(Ts)
    created_by: Mapped[str] = mapped_column(String(128))

    __table_args__ = (UniqueConstraint("name", "version"),)


class VariantRow(Base):
    __tablename__ = "release_variants"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    release_id: Mapped[int] = mapped_column(ForeignKey("model_releases.id", ondelete="CASCADE"))
    variant: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))
    format: Mapped[str] = mapped_column(String(16))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str] = mapped_column(String(255))
    manifest: Mapped[dict[str, Any]] = mapped_column(Json, default=dict)
    created_at: Mapped[datetime] = mapped_column(Ts)
    created_by: Mapped[str] = mapped_column(String(128))

    __table_args__ = (UniqueConstraint("release_id", "variant"),)


class ApiTokenRow(Base):
    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(String(128))
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(Ts)
    created_by: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime | None] = mapped_column(Ts)
    revoked_at: Mapped[datetime | None] = mapped_column(Ts)
    last_used_at: Mapped[datetime | None] = mapped_column(Ts)


class EnrolmentTokenRow(Base):
    __tablename__ = "enrolment_tokens"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    tags: Mapped[dict[str, str]] = mapped_column(Json, default=dict)
    created_at: Mapped[datetime] = mapped_column(Ts)
    created_by: Mapped[str] = mapped_column(String(128))
    expires_at: Mapped[datetime] = mapped_column(Ts)
    used_at: Mapped[datetime | None] = mapped_column(Ts)
    used_by: Mapped[str | None] = mapped_column(String(64))


class AuditRow(Base):
    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    ts: Mapped[datetime] = mapped_column(Ts)
    actor: Mapped[str] = mapped_column(String(128))
    action: Mapped[str] = mapped_column(String(64))
    target_type: Mapped[str] = mapped_column(String(32))
    target_id: Mapped[str] = mapped_column(String(128))
    before: Mapped[dict[str, Any] | None] = mapped_column(Json)
    after: Mapped[dict[str, Any] | None] = mapped_column(Json)

    __table_args__ = (Index(None, "target_type", "target_id", "id"),)


class TelemetryPointRow(Base):
    """System metrics of one device at one time. ``resolution`` 0 is raw; 60 and 300
    are per-minute and per-5-minute aggregates (averages; ``samples`` raw points)."""

    __tablename__ = "telemetry_points"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    ts: Mapped[int] = mapped_column(BigInteger)
    resolution: Mapped[int] = mapped_column(SmallInteger, default=0)
    samples: Mapped[int] = mapped_column(Integer, default=1)
    seq: Mapped[int | None] = mapped_column(BigInteger)
    cpu_percent: Mapped[float | None] = mapped_column(Float)
    mem_used_bytes: Mapped[float | None] = mapped_column(Float)
    mem_total_bytes: Mapped[float | None] = mapped_column(Float)
    agent_rss_bytes: Mapped[float | None] = mapped_column(Float)
    disk_free_bytes: Mapped[float | None] = mapped_column(Float)
    temperature_c: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index(None, "device_id", "resolution", "ts"),
        Index(None, "resolution", "ts"),
    )


class ModelPointRow(Base):
    """Per-model serving metrics of one device at one time.

    ``requests`` and ``errors`` are the agent's counters since it started (cumulative);
    rates are differences of consecutive points (a drop means the agent restarted).
    Aggregates keep the last counter value of the bucket and the worst latencies.
    """

    __tablename__ = "model_points"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    model: Mapped[str] = mapped_column(String(64))
    ts: Mapped[int] = mapped_column(BigInteger)
    resolution: Mapped[int] = mapped_column(SmallInteger, default=0)
    samples: Mapped[int] = mapped_column(Integer, default=1)
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    p50_ms: Mapped[float | None] = mapped_column(Float)
    p95_ms: Mapped[float | None] = mapped_column(Float)
    p99_ms: Mapped[float | None] = mapped_column(Float)
    queue_depth: Mapped[float | None] = mapped_column(Float)

    __table_args__ = (
        Index(None, "device_id", "model", "resolution", "ts"),
        Index(None, "model", "resolution", "ts"),
        Index(None, "resolution", "ts"),
    )


class UpdateEventRow(Base):
    """An ``update`` progress event from a device (consumed by the rollout engine)."""

    __tablename__ = "update_events"

    id: Mapped[int] = mapped_column(Id, primary_key=True, autoincrement=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.id", ondelete="CASCADE"))
    ts: Mapped[datetime] = mapped_column(Ts)
    received_at: Mapped[datetime] = mapped_column(Ts)
    rollout_id: Mapped[str | None] = mapped_column(String(64))
    model: Mapped[str] = mapped_column(String(64))
    from_version: Mapped[str | None] = mapped_column(String(64))
    to_version: Mapped[str | None] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[dict[str, Any] | None] = mapped_column(Json)

    __table_args__ = (
        Index(None, "device_id", "id"),
        Index(None, "rollout_id", "id"),
    )


# The rollout tables share this metadata (migrations and tests see every table).
from fleet_server.store import rollout_models as _rollout_models  # noqa: E402, F401
