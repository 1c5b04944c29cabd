"""The protocol's other documents: status, telemetry, update events, commands, the desired hint.

Each is a frozen pydantic model whose ``to_json()`` is exactly the documented JSON and
whose :func:`decode_document` ignores unknown fields (forward compatibility). Timestamps
are RFC 3339 UTC strings with milliseconds: ``2026-11-23T10:00:00.123Z``.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, ClassVar, Literal, Self, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SerializerFunctionWrapHandler,
    StringConstraints,
    ValidationError,
    model_serializer,
    model_validator,
)

from agent.errors import BadRequest
from agent.protocol.tensors import dumps


def utc_now() -> datetime:
    """The current time, timezone-aware, in UTC."""
    return datetime.now(UTC)


def format_timestamp(ts: datetime) -> str:
    """RFC 3339 in UTC with milliseconds and ``Z``.

    Raises:
        ValueError: ``ts`` is naive (no timezone).
    """
    if ts.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    ts = ts.astimezone(UTC)
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


def parse_timestamp(value: object) -> datetime:
    """An aware UTC datetime from an RFC 3339 string (or an aware datetime).

    Raises:
        ValueError: not a string or datetime, not ISO 8601, or without a UTC offset.

    Sub-millisecond digits are dropped.
    """
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise ValueError("expected an RFC 3339 timestamp with a UTC offset")
    # Milliseconds are what the wire carries: keep no more, so documents round-trip.
    return value.astimezone(UTC).replace(microsecond=value.microsecond // 1000 * 1000)


Timestamp = Annotated[
    datetime, BeforeValidator(parse_timestamp), PlainSerializer(format_timestamp, return_type=str)
]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Count = Annotated[int, Field(ge=0)]


class Document(BaseModel):
    """Base of the documents: frozen, strict types, unknown fields ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, strict=True)
    #: Optional fields that are left out of the JSON (rather than sent as null) when unset.
    omit_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_unset(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for key in self.omit_when_none:
            if data.get(key, 0) is None:
                del data[key]
        return data

    def to_json(self) -> bytes:
        """The document as compact JSON bytes."""
        return dumps(self.model_dump(mode="json"))


class ErrorInfo(Document):
    """``{"code", "message"}``: an error, or the reason of a failed update."""

    code: str
    message: str


# --- status --------------------------------------------------------------------------

AgentState = Literal["online", "degraded", "offline"]
ModelState = Literal["loading", "validating", "ready", "failed"]


class ModelStatus(Document):
    """One model in the status document."""

    version: str
    state: ModelState
    format: str
    provider: str


class StatusDocument(Document):
    """The retained status (also the Last Will, with ``state: offline``).

    ``agent_version``, ``profile`` and ``started_at`` are required unless offline.
    """

    omit_when_none = frozenset({"agent_version", "profile", "started_at", "models"})

    state: AgentState
    ts: Timestamp
    agent_version: str | None = None
    profile: str | None = None
    started_at: Timestamp | None = None
    models: dict[Name, ModelStatus] | None = None

    @model_validator(mode="after")
    def _running_fields(self) -> Self:
        if self.state != "offline":
            missing = [
                k for k in ("agent_version", "profile", "started_at") if getattr(self, k) is None
            ]
            if missing:
                raise ValueError(f"status {self.state!r} needs {', '.join(missing)}")
        return self


# --- telemetry -----------------------------------------------------------------------


class LatencyMs(Document):
    """Latency percentiles over one telemetry interval, in milliseconds."""

    p50: float | None
    p95: float | None
    p99: float | None


class ModelTelemetry(Document):
    """Per-model counters (since the agent started) and this interval's latency."""

    requests: Count
    errors: dict[str, Count]
    latency_ms: LatencyMs | None
    queue_depth: Count
    provider: str


class SystemTelemetry(Document):
    """System gauges; ``temperature_c`` is left out where no sensor exists."""

    omit_when_none = frozenset({"temperature_c"})

    cpu_percent: float
    mem_used_bytes: Count
    mem_total_bytes: Count
    agent_rss_bytes: Count
    disk_free_bytes: Count
    temperature_c: float | None = None


class TelemetryDocument(Document):
    """One telemetry message; ``seq`` increases by one per message."""

    ts: Timestamp
    seq: Count
    system: SystemTelemetry
    models: dict[Name, ModelTelemetry]


# --- OTA -----------------------------------------------------------------------------

UpdateState = Literal[
    "downloading",
    "verifying",
    "validating",
    "activating",
    "probation",
    "committed",
    "failed",
    "rolled_back",
]


class UpdateEvent(Document):
    """Progress of one model update; ``reason`` is set exactly on failed and rolled_back."""

    ts: Timestamp
    rollout_id: str | None
    model: Name
    from_version: str | None
    to_version: str
    state: UpdateState
    reason: ErrorInfo | None = None

    @model_validator(mode="after")
    def _reason_when_failed(self) -> Self:
        if (self.reason is not None) != (self.state in ("failed", "rolled_back")):
            raise ValueError("'reason' is required on failed and rolled_back, and only there")
        return self


class DesiredHint(Document):
    """The retained, untrusted hint that new signed metadata may be waiting."""

    revision: Count


# --- operator commands -----------------------------------------------------------------


class Command(Document):
    """An operator command sent to ``{prefix}/{device}/cmd``."""

    id: Annotated[str, StringConstraints(min_length=1, max_length=128)]
    command: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,63}$")]
    args: dict[str, Any] = Field(default_factory=dict)
    ts: Timestamp


class CommandReply(Document):
    """The answer on ``.../cmd/reply``: ``result`` on success or ``error``, never both."""

    omit_when_none = frozenset({"result", "error"})

    id: str
    ts: Timestamp
    result: dict[str, Any] | None = None
    error: ErrorInfo | None = None

    @model_validator(mode="after")
    def _one_outcome(self) -> Self:
        if (self.result is None) == (self.error is None):
            raise ValueError("a command reply has exactly one of 'result' and 'error'")
        return self


DocumentT = TypeVar("DocumentT", bound=Document)


def decode_document(cls: type[DocumentT], payload: bytes | bytearray | memoryview) -> DocumentT:
    """Parse and validate one document of type ``cls``; unknown fields are ignored.

    An empty payload (how a retained message is cleared) is refused: check for it first.

    Raises:
        BadRequest: empty, not a JSON object, or missing/ill-typed fields.
    """
    if not payload:
        raise BadRequest(f"empty {cls.__name__} payload")
    try:
        return cls.model_validate_json(bytes(payload))
    except ValidationError as exc:
        first = exc.errors()[0] if exc.error_count() else {"loc": (), "msg": "invalid"}
        where = ".".join(str(p) for p in first["loc"]) or "document"
        raise BadRequest(f"invalid {cls.__name__}: {where}: {first['msg']}"[:300]) from None
