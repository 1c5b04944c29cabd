"""The agent config (``/etc/edge-agent/agent.yaml``): typed, validated, strict.

The smallest valid file::

    device_id: cam-01
    mqtt: {url: "mqtt://127.0.0.1:1883"}
    models:
      - name: face
        path: /var/lib/edge-agent/models/face.tflite

Every section is a pydantic model with ``extra="forbid"``: a misspelt key is an error,
and :func:`load_config` names the bad field (``models.0.queue_size: ...``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from agent.errors import ConfigError
from agent.protocol import DEFAULT_PREFIX, check_prefix, is_valid_id
from agent.transport import MqttConfig
from agent.updater.config import UpdateConfig

DEFAULT_CONFIG = Path("/etc/edge-agent/agent.yaml")
DEFAULT_STATE_DIR = Path("/var/lib/edge-agent")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """One model the device serves."""

    #: The name clients use in ``edge/{device}/infer/{name}``.
    name: str
    #: A bundle (folder, ``.tar``, ``.tgz``) or a bare ``.onnx``/``.tflite`` file.
    path: Path
    #: Requests waiting for this model; a full queue answers ``overloaded`` at once.
    queue_size: int = Field(64, ge=1, le=100_000)
    #: Largest micro-batch (only for models whose batch dimension is dynamic).
    max_batch: int = Field(1, ge=1, le=1024)
    #: How long the worker waits to fill a micro-batch once it holds one request.
    max_delay_ms: float = Field(2.0, ge=0, le=1000)
    #: Run requests on the MQTT thread itself while the model is idle and its recent
    #: inferences took less than this many ms (0: always use the worker thread).
    inline_below_ms: float = Field(3.0, ge=0, le=100)

    @field_validator("name")
    @classmethod
    def _valid_name(cls, v: str) -> str:
        if not is_valid_id(v):
            raise ValueError("must match [A-Za-z0-9_.-]{1,64}")
        return v


class TelemetryConfig(_Strict):
    interval_s: float = Field(10.0, ge=0.1, le=86_400)
    #: 0 as the protocol says; 1 makes delivery at-least-once (the outbox keeps an entry
    #: until the broker has it).
    qos: Literal[0, 1] = 0
    #: Entries the on-disk outbox keeps while the broker is unreachable (oldest dropped).
    outbox_max_entries: int = Field(10_000, ge=10, le=10_000_000)


class PrometheusConfig(_Strict):
    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = Field(9464, ge=1, le=65535)


class LimitsConfig(_Strict):
    #: Largest request payload; larger ones are answered ``payload_too_large``.
    max_payload_bytes: int = Field(8 * 1024 * 1024, ge=1024, le=1024**3)


class LifecycleConfig(_Strict):
    #: Tell systemd READY after this long even if the broker is unreachable; the agent
    #: keeps trying and serves once it connects.
    ready_timeout_s: float = Field(10.0, ge=0, le=3600)
    #: On SIGTERM, how long in-flight and queued requests may take to finish.
    drain_timeout_s: float = Field(5.0, ge=0, le=600)
    #: A worker busy on one request for longer than this is reported stuck (systemd
    #: watchdog pings stop).
    stuck_worker_s: float = Field(60.0, gt=0, le=86_400)


class AgentConfig(_Strict):
    """The whole agent config."""

    device_id: str
    #: A device profile name; detected from the hardware when left out.
    profile: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    topic_prefix: str = DEFAULT_PREFIX
    mqtt: MqttConfig
    models: list[ModelConfig] = Field(default_factory=list)
    telemetry: TelemetryConfig = TelemetryConfig()
    prometheus: PrometheusConfig = PrometheusConfig()
    limits: LimitsConfig = LimitsConfig()
    lifecycle: LifecycleConfig = LifecycleConfig()
    #: Signed model updates from the fleet server; off when left out.
    updates: UpdateConfig | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @model_validator(mode="before")
    @classmethod
    def _default_client_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("mqtt"), dict):
            mqtt = data["mqtt"]
            if "client_id" not in mqtt and isinstance(data.get("device_id"), str):
                data = {**data, "mqtt": {**mqtt, "client_id": data["device_id"]}}
        return data

    @field_validator("device_id")
    @classmethod
    def _valid_device(cls, v: str) -> str:
        if not is_valid_id(v):
            raise ValueError("must match [A-Za-z0-9_.-]{1,64}")
        return v

    @field_validator("topic_prefix")
    @classmethod
    def _valid_prefix(cls, v: str) -> str:
        try:
            return check_prefix(v)
        except Exception as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _unique_models(self) -> AgentConfig:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"models: the name {dupes[0]!r} is used twice")
        return self


def parse_config(data: object, source: str = "config") -> AgentConfig:
    """Validate a parsed YAML document.

    Raises:
        ConfigError: naming the first bad field, e.g. ``models.0.queue_size: ...``.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the config must be a YAML mapping")
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from None


def load_config(path: Path) -> AgentConfig:
    """Read and validate the config file at ``path``.

    Raises:
        ConfigError: the file is missing, not YAML, or invalid (the bad field named).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    return parse_config(data, str(path))


def _describe(exc: ValidationError) -> str:
    errors = exc.errors()
    parts = []
    for err in errors[:3]:
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}")
    more = f" (and {len(errors) - 3} more)" if len(errors) > 3 else ""
    return "; ".join(parts) + more
