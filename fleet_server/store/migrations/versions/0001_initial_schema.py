"""Initial schema: devices, tags, reported/desired models, releases, tokens, audit,
time series and update events.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

JSON_ = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
ID_ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", ID_, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_tokens_token_hash")),
    )
    op.create_table(
        "audit_log",
        sa.Column("id", ID_, autoincrement=True, nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=128), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("target_type", sa.String(length=32), nullable=False),
        sa.Column("target_id", sa.String(length=128), nullable=False),
        sa.Column("before", JSON_, nullable=True),
        sa.Column("after", JSON_, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_log")),
    )
    op.create_index(
        op.f("ix_audit_log_target_type_target_id_id"),
        "audit_log",
        ["target_type", "target_id", "id"],
        unique=False,
    )

    op.create_table(
        "devices",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("reported_state", sa.String(length=16), nullable=False),
        sa.Column("profile", sa.String(length=128), nullable=True),
        sa.Column("agent_version", sa.String(length=64), nullable=True),
        sa.Column("facts", JSON_, nullable=False),
        sa.Column("status", JSON_, nullable=True),
        sa.Column("status_ts", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_seen", sa.DateTime(timezone=True), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cert_serial", sa.String(length=128), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_devices")),
    )
    op.create_index(op.f("ix_devices_profile_id"), "devices", ["profile", "id"], unique=False)

    op.create_table(
        "enrolment_tokens",
        sa.Column("id", ID_, autoincrement=True, nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("tags", JSON_, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("used_by", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_enrolment_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_enrolment_tokens_token_hash")),
    )
    op.create_table(
        "model_releases",
        sa.Column("id", ID_, autoincrement=True, nullable=False),
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_releases")),
        sa.UniqueConstraint("name", "version", name=op.f("uq_model_releases_name_version")),
    )
    op.create_table(
        "desired_models",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("variant", sa.String(length=64), nullable=False),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_desired_models_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "model", name=op.f("pk_desired_models")),
    )
    op.create_table(
        "device_models",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=True),
        sa.Column("provider", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_models_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "model", name=op.f("pk_device_models")),
    )
    op.create_index(
        op.f("ix_device_models_model_version_device_id"),
        "device_models",
        ["model", "version", "device_id"],
        unique=False,
    )

    op.create_table(
        "device_tags",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("key", sa.String(length=64), nullable=False),
        sa.Column("value", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_device_tags_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("device_id", "key", name=op.f("pk_device_tags")),
    )
    op.create_index(
        op.f("ix_device_tags_key_value_device_id"),
        "device_tags",
        ["key", "value", "device_id"],
        unique=False,
    )

    op.create_table(
        "model_points",
        sa.Column("id", ID_, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("resolution", sa.SmallInteger(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("requests", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("p50_ms", sa.Float(), nullable=True),
        sa.Column("p95_ms", sa.Float(), nullable=True),
        sa.Column("p99_ms", sa.Float(), nullable=True),
        sa.Column("queue_depth", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_model_points_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_model_points")),
    )
    op.create_index(
        op.f("ix_model_points_device_id_model_resolution_ts"),
        "model_points",
        ["device_id", "model", "resolution", "ts"],
        unique=False,
    )
    op.create_index(
        op.f("ix_model_points_model_resolution_ts"),
        "model_points",
        ["model", "resolution", "ts"],
        unique=False,
    )
    op.create_index(
        op.f("ix_model_points_resolution_ts"), "model_points", ["resolution", "ts"], unique=False
    )

    op.create_table(
        "release_variants",
        sa.Column("id", ID_, autoincrement=True, nullable=False),
        sa.Column("release_id", ID_, nullable=False),
        sa.Column("variant", sa.String(length=64), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("format", sa.String(length=16), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("filename", sa.String(length=255), nullable=False),
        sa.Column("manifest", JSON_, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.ForeignKeyConstraint(
            ["release_id"],
            ["model_releases.id"],
            name=op.f("fk_release_variants_release_id_model_releases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_release_variants")),
        sa.UniqueConstraint(
            "release_id", "variant", name=op.f("uq_release_variants_release_id_variant")
        ),
    )
    op.create_index(
        op.f("ix_release_variants_sha256"), "release_variants", ["sha256"], unique=False
    )

    op.create_table(
        "telemetry_points",
        sa.Column("id", ID_, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.BigInteger(), nullable=False),
        sa.Column("resolution", sa.SmallInteger(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=True),
        sa.Column("cpu_percent", sa.Float(), nullable=True),
        sa.Column("mem_used_bytes", sa.Float(), nullable=True),
        sa.Column("mem_total_bytes", sa.Float(), nullable=True),
        sa.Column("agent_rss_bytes", sa.Float(), nullable=True),
        sa.Column("disk_free_bytes", sa.Float(), nullable=True),
        sa.Column("temperature_c", sa.Float(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_telemetry_points_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_telemetry_points")),
    )
    op.create_index(
        op.f("ix_telemetry_points_device_id_resolution_ts"),
        "telemetry_points",
        ["device_id", "resolution", "ts"],
        unique=False,
    )
    op.create_index(
        op.f("ix_telemetry_points_resolution_ts"),
        "telemetry_points",
        ["resolution", "ts"],
        unique=False,
    )

    op.create_table(
        "update_events",
        sa.Column("id", ID_, autoincrement=True, nullable=False),
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("ts", sa.DateTime(timezone=True), nullable=False),
        sa.Column("received_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("rollout_id", sa.String(length=64), nullable=True),
        sa.Column("model", sa.String(length=64), nullable=False),
        sa.Column("from_version", sa.String(length=64), nullable=True),
        sa.Column("to_version", sa.String(length=64), nullable=True),
        sa.Column("state", sa.String(length=16), nullable=False),
        sa.Column("reason", JSON_, nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["devices.id"],
            name=op.f("fk_update_events_device_id_devices"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_update_events")),
    )
    op.create_index(
        op.f("ix_update_events_device_id_id"), "update_events", ["device_id", "id"], unique=False
    )
    op.create_index(
        op.f("ix_update_events_rollout_id_id"), "update_events", ["rollout_id", "id"], unique=False
    )


def downgrade() -> None:
    op.drop_index(op.f("ix_update_events_rollout_id_id"), table_name="update_events")
    op.drop_index(op.f("ix_update_events_device_id_id"), table_name="update_events")
    op.drop_table("update_events")
    op.drop_index(op.f("ix_telemetry_points_resolution_ts"), table_name="telemetry_points")
    op.drop_index(
        op.f("ix_telemetry_points_device_id_resolution_ts"), table_name="telemetry_points"
    )
    op.drop_table("telemetry_points")
    op.drop_index(op.f("ix_release_variants_sha256"), table_name="release_variants")
    op.drop_table("release_variants")
    op.drop_index(op.f("ix_model_points_resolution_ts"), table_name="model_points")
    op.drop_index(op.f("ix_model_points_model_resolution_ts"), table_name="model_points")
    op.drop_index(op.f("ix_model_points_device_id_model_resolution_ts"), table_name="model_points")
    op.drop_table("model_points")
    op.drop_index(op.f("ix_device_tags_key_value_device_id"), table_name="device_tags")
    op.drop_table("device_tags")
    op.drop_index(op.f("ix_device_models_model_version_device_id"), table_name="device_models")
    op.drop_table("device_models")
    op.drop_table("desired_models")
    op.drop_table("model_releases")
    op.drop_table("enrolment_tokens")
    op.drop_index(op.f("ix_devices_profile_id"), table_name="devices")
    op.drop_table("devices")
    op.drop_index(op.f("ix_audit_log_target_type_target_id_id"), table_name="audit_log")
    op.drop_table("audit_log")
    op.drop_table("api_tokens")
