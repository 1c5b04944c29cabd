"""Request and response bodies of the API (they make ``/openapi.json``)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleet_server import domain
from fleet_server.domain import DeviceState, Role

# --- shared ------------------------------------------------------------------------


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "missing, unknown, revoked or expired token"},
    403: {"model": ErrorResponse, "description": "the token's role is too small"},
    503: {"model": ErrorResponse, "description": "the database is unavailable"},
}


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


# --- devices -------------------------------------------------------------------------


class ReportedModelOut(BaseModel):
    name: str
    version: str
    state: str
    format: str | None
    provider: str | None


class DesiredModelOut(BaseModel):
    name: str
    version: str
    variant: str
    revision: int


class DeviceOut(BaseModel):
    id: str
    state: DeviceState
    reported_state: str
    profile: str | None
    agent_version: str | None
    tags: dict[str, str]
    facts: dict[str, Any]
    last_seen: datetime | None
    created_at: datetime
    enrolled_at: datetime | None
    revoked_at: datetime | None
    cert_serial: str | None
    models: list[ReportedModelOut]
    desired: list[DesiredModelOut]

    @classmethod
    def of(cls, d: domain.Device) -> DeviceOut:
        return cls(
            id=d.id,
            state=d.state,
            reported_state=d.reported_state,
            profile=d.profile,
            agent_version=d.agent_version,
            tags=d.tags,
            facts=d.facts,
            last_seen=d.last_seen,
            created_at=d.created_at,
            enrolled_at=d.enrolled_at,
            revoked_at=d.revoked_at,
            cert_serial=d.cert_serial,
            models=[ReportedModelOut(**m.__dict__) for m in d.models],
            desired=[DesiredModelOut(**m.__dict__) for m in d.desired],
        )


class DevicePage(BaseModel):
    items: list[DeviceOut]
    next_cursor: str | None


class TagChange(_In):
    set: dict[str, str] = Field(default_factory=dict, description="tags to add or change")
    remove: list[str] = Field(default_factory=list, description="tag keys to delete")


class SystemPointOut(BaseModel):
    ts: datetime
    cpu_percent: float | None
    mem_used_bytes: float | None
    mem_total_bytes: float | None
    agent_rss_bytes: float | None
    disk_free_bytes: float | None
    temperature_c: float | None
    samples: int


class ModelPointOut(BaseModel):
    ts: datetime
    requests: int
    errors: int
    p50_ms: float | None
    p95_ms: float | None
    p99_ms: float | None
    queue_depth: float | None
    devices: int


class DeviceSeries(BaseModel):
    device_id: str
    since: datetime
    until: datetime
    step_s: int
    points: list[SystemPointOut]


class ModelSeries(BaseModel):
    model: str
    device_id: str | None
    since: datetime
    until: datetime
    step_s: int
    points: list[ModelPointOut]


# --- enrolment -----------------------------------------------------------------------


class EnrolmentTokenIn(_In):
    tags: dict[str, str] = Field(default_factory=dict)
    expires_in_s: int = Field(default=3600, ge=1, description="lifetime of the token")


class EnrolmentTokenOut(BaseModel):
    id: int
    prefix: str
    tags: dict[str, str]
    created_at: datetime
    created_by: str
    expires_at: datetime
    used_at: datetime | None
    used_by: str | None

    @classmethod
    def of(cls, t: domain.EnrolmentToken) -> EnrolmentTokenOut:
        return cls(**t.__dict__)


class EnrolmentTokenCreated(EnrolmentTokenOut):
    token: str = Field(description="the secret: shown once, stored only as a hash")


class EnrolIn(_In):
    token: str = Field(min_length=8, max_length=256)
    csr_pem: str = Field(min_length=1, max_length=16_384)
    facts: dict[str, Any] = Field(default_factory=dict)


class EnrolOut(BaseModel):
    device_id: str
    certificate_pem: str
    ca_certificate_pem: str
    broker_url: str | None
    server_url: str | None
    trust_root: dict[str, Any] | None = Field(
        description="the image repository's root.json (the device's update trust anchor)"
    )
    director_root: dict[str, Any] | None = Field(
        default=None, description="the director's root.json (the second trust anchor)"
    )


# --- API tokens ----------------------------------------------------------------------


class ApiTokenIn(_In):
    name: str = Field(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.@-]+$")
    role: Role
    expires_in_s: int | None = Field(default=None, ge=60)


class ApiTokenOut(BaseModel):
    id: int
    name: str
    role: Role
    prefix: str
    created_at: datetime
    created_by: str
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, t: domain.ApiToken) -> ApiTokenOut:
        return cls(**t.__dict__)


class ApiTokenCreated(ApiTokenOut):
    token: str = Field(description="the secret: shown once, stored only as a hash")


# --- releases ------------------------------------------------------------------------


class VariantOut(BaseModel):
    variant: str
    kind: domain.ArtifactKind
    format: str
    sha256: str
    size: int
    filename: str
    manifest: dict[str, Any]
    created_at: datetime
    created_by: str


class ReleaseOut(BaseModel):
    name: str
    version: str
    created_at: datetime
    created_by: str
    variants: list[VariantOut]

    @classmethod
    def of(cls, r: domain.ModelRelease) -> ReleaseOut:
        return cls(
            name=r.name,
            version=r.version,
            created_at=r.created_at,
            created_by=r.created_by,
            variants=[VariantOut(**v.__dict__) for v in r.variants],
        )


class ReleasePage(BaseModel):
    items: list[ReleaseOut]
    next_cursor: str | None


# --- audit ---------------------------------------------------------------------------


class AuditOut(BaseModel):
    id: int
    ts: datetime
    actor: str
    action: str
    target_type: str
    target_id: str
    before: dict[str, Any] | None
    after: dict[str, Any] | None


class AuditPage(BaseModel):
    items: list[AuditOut]
    next_cursor: str | None
