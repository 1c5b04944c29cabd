"""The fleet's core vocabulary: roles, device states, and the records the store returns.

Repository functions (``fleet_server.store``) return these frozen dataclasses, never ORM
objects, so the API and CLI layers do not depend on SQLAlchemy sessions.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Generic, TypeVar

#: Device ids and model names: the device protocol's alphabet.
NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
#: Tag keys: a conservative alphabet so ``key=value`` parses without escaping.
TAG_KEY_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
TAG_VALUE_MAX = 128

T = TypeVar("T")


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """``value`` as aware UTC (naive values, as SQLite returns them, are taken to be UTC)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class Role(enum.StrEnum):
    """Operator roles, ordered: a role may do everything a smaller one may."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _ROLE_RANK[self]

    def allows(self, needed: Role) -> bool:
        """True when this role is at least ``needed``."""
        return self.rank >= needed.rank


_ROLE_RANK = {Role.VIEWER: 0, Role.OPERATOR: 1, Role.ADMIN: 2}


class ReportedState(enum.StrEnum):
    """The ``state`` field of a device's retained status (the protocol's values)."""

    ONLINE = "online"
    DEGRADED = "degraded"
    OFFLINE = "offline"
    UNKNOWN = "unknown"  # enrolled, never heard from


class DeviceState(enum.StrEnum):
    """What the API shows: the reported state, or ``stale`` when telemetry stopped.

    A device is ``stale`` when it claims to be online or degraded but no message came
    from it for ``stale_after_intervals`` telemetry intervals. Computed at read time from
    ``last_seen``, so no sweeper is needed and every replica agrees.
    """

    ONLINE = "online"
    DEGRADED = "degraded"
    STALE = "stale"
    OFFLINE = "offline"
    UNKNOWN = "unknown"


def effective_state(
    reported: str, last_seen: datetime | None, now: datetime, stale_after: timedelta
) -> DeviceState:
    """The state shown for a device, from its reported state and when it was last seen."""
    if reported in (ReportedState.ONLINE, ReportedState.DEGRADED):
        if last_seen is None or as_utc(last_seen) < now - stale_after:
            return DeviceState.STALE
        return DeviceState(reported)
    if reported == ReportedState.OFFLINE:
        return DeviceState.OFFLINE
    return DeviceState.UNKNOWN


class UpdateState(enum.StrEnum):
    """The ``state`` of an ``update`` event (device protocol, OTA section)."""

    DOWNLOADING = "downloading"
    VERIFYING = "verifying"
    VALIDATING = "validating"
    ACTIVATING = "activating"
    PROBATION = "probation"
    COMMITTED = "committed"
    FAILED = "failed"
    ROLLED_BACK = "rolled_back"


class ArtifactKind(enum.StrEnum):
    """What a release variant's artifact is."""

    BUNDLE = "bundle"  # a .tar/.tgz with a manifest (and maybe golden vectors)
    MODEL = "model"  # a bare .onnx / .tflite file


@dataclass(frozen=True)
class ReportedModel:
    """One model a device says it runs (from its status document)."""

    name: str
    version: str
    state: str
    format: str | None = None
    provider: str | None = None


@dataclass(frozen=True)
class DesiredModel:
    """A model version a device should run (written by the OTA work; read here)."""

    name: str
    version: str
    variant: str
    revision: int


@dataclass(frozen=True)
class Device:
    """A device as the inventory knows it."""

    id: str
    state: DeviceState
    reported_state: str
    profile: str | None
    agent_version: str | None
    facts: dict[str, Any]
    tags: dict[str, str]
    last_seen: datetime | None
    created_at: datetime
    enrolled_at: datetime | None = None
    revoked_at: datetime | None = None
    cert_serial: str | None = None
    models: tuple[ReportedModel, ...] = ()
    desired: tuple[DesiredModel, ...] = ()


@dataclass(frozen=True)
class Variant:
    """One artifact of a release: a bundle or a bare model, by content hash."""

    variant: str
    kind: ArtifactKind
    format: str
    sha256: str
    size: int
    filename: str
    manifest: dict[str, Any]
    created_at: datetime
    created_by: str


@dataclass(frozen=True)
class ModelRelease:
    """A named, versioned model with one or more variants (int8, fp16, tflite...)."""

    id: int
    name: str
    version: str
    created_at: datetime
    created_by: str
    variants: tuple[Variant, ...] = field(default=())


@dataclass(frozen=True)
class ApiToken:
    """An operator API token (the secret itself is never stored)."""

    id: int
    name: str
    role: Role
    prefix: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True)
class EnrolmentToken:
    """A single-use, short-lived device enrolment token (stored as a hash)."""

    id: int
    prefix: str
    tags: dict[str, str]
    created_at: datetime
    created_by: str
    expires_at: datetime
    used_at: datetime | None
    used_by: str | None


@dataclass(frozen=True)
class AuditEntry:
    """One mutation: who did what to which thing, and the before/after pictures."""

    id: int
    ts: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list; ``next_cursor`` is ``None`` on the last page."""

    items: list[T]
    next_cursor: str | None


def parse_tag(text: str) -> tuple[str, str]:
    """Split ``key=value`` into its parts.

    Raises:
        ValueError: no ``=``, an empty or ill-formed key, or a value that is too long.
    """
    key, sep, value = text.partition("=")
    if not sep or not TAG_KEY_RE.match(key):
        raise ValueError(f"tag {text!r}: expected key=value with key in [A-Za-z0-9_.-]")
    if len(value) > TAG_VALUE_MAX:
        raise ValueError(f"tag {key!r}: value longer than {TAG_VALUE_MAX} characters")
    return key, value
