"""Staged rollouts: rollouts, rollout devices, device pins, director revisions (the hint
outbox), and which rollout assigned each desired model.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON_ = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID_ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _device_fk(table: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        ["device_id"],
        ["devices.id"],
        name=op.f(f"fk_{table}_device_id_devices"),
        ondelete="CASCADE",
    )


def upgrade() -> None:
    op.create_table(
        "rollouts",
        sa.Column("id", ID_, autoincrement=True, nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("variants", JSON_, nullable=False),
        sa.Column("target", JSON_, nullable=False),
        sa.Column("waves", JSON_, nullable=False),
        sa.Column("wave_sizes", JSON_, nullable=False),
        sa.Column("dwell_s", sa.Integer(), nullable=False),
        sa.Column("probation_s", sa.Integer(), nullable=False),
        sa.Column("gates", JSON_, nullable=False),
        sa.Column("auto_rollback", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", JSON_, nullable=True),
        sa.Column("current_wave", sa.Integer(), nullable=False),
        sa.Column("wave_started_at", TS, nullable=True),
        sa.Column("events_seen", sa.BigInteger(), nullable=False),
        sa.Column("settled", sa.Boolean(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("finished_at", TS, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
    )
    op.create_index(op.f("ix_rollouts_state_id"), "rollouts", ["state", "id"], unique=False)
    op.create_index(op.f("ix_rollouts_model_id"), "rollouts", ["model", "id"], unique=False)

    op.create_table(
        "rollout_devices",
        sa.Column("rollout_id", ID_, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("wave", sa.Integer(), nullable=False),
        sa.Column("profile", sa.String(length=128), nullable=True),
        sa.Column("variant", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", JSON_, nullable=True),
        sa.Column("last_event", sa.String(length=16), nullable=True),
        sa.Column("last_event_ts", TS, nullable=True),
        sa.Column("last_event_id", sa.BigInteger(), nullable=True),
        sa.Column("prev_version", sa.String(length=64), nullable=True),
        sa.Column("prev_variant", sa.String(length=64), nullable=True),
        sa.Column("prev_rollout_id", sa.BigInteger(), nullable=True),
        sa.Column("assigned_at", TS, nullable=True),
        sa.Column("probation_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.Column("activated_ts", sa.BigInteger(), nullable=True),
        sa.Column("waived", sa.Boolean(), nullable=False),
        _device_fk("rollout_devices"),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_rollout_devices_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("rollout_id", "device_id", name=op.f("pk_rollout_devices")),
    )
    op.create_index(
        op.f("ix_rollout_devices_rollout_id_wave_state"),
        "rollout_devices",
        ["rollout_id", "wave", "state"],
        unique=False,
    )
    op.create_index(
        op.f("ix_rollout_devices_device_id_rollout_id"),
        "rollout_devices",
        ["device_id", "rollout_id"],
        unique=False,
    )

    op.create_table(
        "device_pins",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("variant", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        _device_fk("device_pins"),
        sa.PrimaryKeyConstraint("device_id", "model", name=op.f("pk_device_pins")),
    )

    op.create_table(
        "device_revisions",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.Column("published_revision", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        _device_fk("device_revisions"),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_device_revisions")),
    )
    pending = sa.text("revision > published_revision")
    op.create_index(
        "ix_device_revisions_hint_pending",
        "device_revisions",
        ["device_id"],
        unique=False,
        postgresql_where=pending,
        sqlite_where=pending,
    )

    op.add_column("desired_models", sa.Column("rollout_id", sa.BigInteger(), nullable=True))
    # Devices that already have desired models start from their highest row revision.
    op.execute(
        "INSERT INTO device_revisions (device_id, revision, published_revision, updated_at) "
        "SELECT device_id, MAX(revision), MAX(revision), MAX(updated_at) "
        "FROM desired_models GROUP BY device_id"
    )


def downgrade() -> None:
    with op.batch_alter_table("desired_models") as batch:
        batch.drop_column("rollout_id")
    op.drop_index("ix_device_revisions_hint_pending", table_name="device_revisions")
    op.drop_table("device_revisions")
    op.drop_table("device_pins")
    op.drop_index(op.f("ix_rollout_devices_device_id_rollout_id"), table_name="rollout_devices")
    op.drop_index(op.f("ix_rollout_devices_rollout_id_wave_state"), table_name="rollout_devices")
    op.drop_table("rollout_devices")
    op.drop_index(op.f("ix_rollouts_model_id"), table_name="rollouts")
    op.drop_index(op.f("ix_rollouts_state_id"), table_name="rollouts")
    op.drop_table("rollouts")
