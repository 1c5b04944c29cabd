"""What a simulated fleet is: its size, its devices' profiles and models, how they behave.

Every field has a flag in ``scripts/simulate-fleet`` (``fleet_server.simulator.cli``); the
model forbids unknown keys, so a typo fails at start-up with the key named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Self
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.bundle import is_semver
from agent.profiles import list_profiles
from fleet_server.domain import NAME_RE, TAG_KEY_RE, TAG_VALUE_MAX

#: A realistic mix of the shipped profiles (weights, not counts).
DEFAULT_PROFILES: dict[str, float] = {
    "raspberry-pi-5": 4,
    "jetson-orin": 2,
    "generic-x86_64": 2,
    "coral-usb": 1,
    "rockchip-rk3588": 1,
}


class ModelSpec(BaseModel):
    """A model every simulated device runs at start: ``face@1.0.0`` (ONNX) or
    ``face@1.0.0:tflite``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_RE.pattern)
    version: str
    format: Literal["onnx", "tflite"] = "onnx"

    @field_validator("version")
    @classmethod
    def _semver(cls, version: str) -> str:
        if not is_semver(version):
            raise ValueError(f"{version!r} is not a semantic version")
        return version

    @classmethod
    def parse(cls, text: str) -> ModelSpec:
        """``NAME@VERSION[:FORMAT]``.

        Raises:
            ValueError: not of that form, or an invalid part.
        """
        name, sep, rest = text.partition("@")
        version, _, fmt = rest.partition(":")
        if not sep or not name or not version:
            raise ValueError(f"{text!r}: expected NAME@VERSION[:FORMAT], e.g. face@1.0.0")
        return cls.model_validate({"name": name, "version": version, "format": fmt or "onnx"})


class SimulatorSettings(BaseModel):
    """Everything one simulator process needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # --- where ------------------------------------------------------------------------
    #: The fleet server (director metadata, artifacts, enrolment).
    server_url: str = "http://127.0.0.1:8080"
    #: ``mqtt://host:1883`` or ``mqtts://host:8883``.
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    topic_prefix: str = Field(default="edge", pattern=r"^[A-Za-z0-9_./-]{1,64}$")
    #: CA file for ``mqtts://`` and ``https://`` (default: the system's).
    ca_file: Path | None = None

    # --- who ----------------------------------------------------------------------------
    devices: int = Field(default=100, ge=1, le=200_000)
    #: Device ids are ``{id_prefix}-{n:05d}`` for n from ``first_index``.
    id_prefix: str = Field(default="sim", pattern=r"^[A-Za-z0-9_.-]{1,40}$")
    first_index: int = Field(default=0, ge=0)
    #: profile name -> weight; each device gets one, deterministically from its id.
    profiles: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_PROFILES))
    models: tuple[ModelSpec, ...] = (ModelSpec(name="face", version="1.0.0"),)

    # --- how they reach the broker and the server ---------------------------------------
    #: ``device``: one MQTT connection per device, with its own Last Will (the broker can
    #: authorise each device). ``shared``: ``connections`` connections carry every
    #: device's messages: load only (see docs/simulator.md).
    connection: Literal["device", "shared"] = "device"
    connections: int = Field(default=4, ge=1, le=1000)
    #: ``auto``: the server's ingest registers devices it first hears of
    #: (``ingest.auto_register``). ``enrol``: each device redeems a single-use enrolment
    #: token (``POST /api/v1/enroll``) minted with ``api_token``, and gets ``tags``.
    registration: Literal["auto", "enrol"] = "auto"
    api_token: str | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    #: Shared connections only: the broker identity they log in as.
    mqtt_username: str | None = None
    mqtt_password: str | None = None
    mqtt_cert_file: Path | None = None
    mqtt_key_file: Path | None = None
    keepalive_s: int = Field(default=60, ge=5, le=3600)
    #: New MQTT connections per second while the fleet starts (and reconnects).
    connect_rate: float = Field(default=500.0, gt=0)

    # --- what they do --------------------------------------------------------------------
    #: Seconds between two telemetry documents of a device.
    interval_s: float = Field(default=10.0, ge=0.1)
    #: Inference requests per second per model that the devices pretend to serve.
    request_rate: float = Field(default=2.0, ge=0)
    #: Fraction of requests answered with an error code.
    error_rate: float = Field(default=0.002, ge=0, le=1)

    # --- updates -----------------------------------------------------------------------
    #: Fraction of updates that fail (half at ``validating``, half rolled back in
    #: probation).
    failure_rate: float = Field(default=0.0, ge=0, le=1)
    #: Mean seconds each update step (downloading ... activating) takes, spread +/-50 %.
    step_s: float = Field(default=0.5, ge=0)
    #: The devices' own probation before they report ``committed``.
    probation_s: float = Field(default=10.0, ge=0)
    #: How much slower (0.3 = 30 %) a model runs after an update: exercises the latency gate.
    latency_regression: float = Field(default=0.0, ge=-0.9, le=100)
    #: Seconds between polls of the director (+/- 20 %); 0: only hints wake a device.
    poll_interval_s: float = Field(default=300.0, ge=0)
    #: Check for updates when a device starts, as the agent does.
    initial_check: bool = True
    #: A device checks at most this often, however many hints arrive.
    min_check_interval_s: float = Field(default=5.0, ge=0)
    #: Update checks and downloads in flight at once (worker threads).
    http_concurrency: int = Field(default=8, ge=1, le=256)
    #: Where the devices keep their TUF metadata (default: a temporary folder).
    state_dir: Path | None = None

    # --- outages -------------------------------------------------------------------------
    #: Fraction of the fleet that is offline at any moment, on average.
    offline_rate: float = Field(default=0.0, ge=0, lt=1)
    #: Mean length of one outage, in seconds.
    offline_s: float = Field(default=60.0, gt=0)

    # --- the run -------------------------------------------------------------------------
    #: Stop after this many seconds (default: until Ctrl-C).
    duration_s: float | None = Field(default=None, gt=0)
    summary_interval_s: float = Field(default=5.0, gt=0)
    #: Where the counters are written (JSON, replaced atomically) at every summary.
    stats_file: Path | None = None
    seed: int = 0

    @field_validator("profiles")
    @classmethod
    def _profiles(cls, profiles: dict[str, float]) -> dict[str, float]:
        known = {p.name for p in list_profiles()}
        unknown = sorted(set(profiles) - known)
        if unknown:
            raise ValueError(f"unknown profile {unknown[0]!r} (known: {', '.join(sorted(known))})")
        if not profiles or any(w < 0 for w in profiles.values()) or sum(profiles.values()) <= 0:
            raise ValueError("give at least one profile with a positive weight")
        return profiles

    @field_validator("models")
    @classmethod
    def _models(cls, models: tuple[ModelSpec, ...]) -> tuple[ModelSpec, ...]:
        names = [m.name for m in models]
        if len(set(names)) != len(names):
            raise ValueError("a model is named twice")
        return models

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: dict[str, str]) -> dict[str, str]:
        for key, value in tags.items():
            if not TAG_KEY_RE.match(key) or len(value) > TAG_VALUE_MAX:
                raise ValueError(f"bad tag {key}={value}")
        return tags

    @field_validator("server_url")
    @classmethod
    def _server(cls, url: str) -> str:
        if urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("expected http://host:port or https://host:port")
        return url.rstrip("/")

    @field_validator("mqtt_url")
    @classmethod
    def _broker(cls, url: str) -> str:
        if urlsplit(url).scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError("expected mqtt://host[:port] or mqtts://host[:port]")
        return url

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.registration == "enrol" and not self.api_token:
            raise ValueError("registration 'enrol' needs an operator API token (--api-token)")
        if self.tags and self.registration != "enrol":
            raise ValueError("tags come with enrolment: use --register enrol")
        shared_only = (self.mqtt_username, self.mqtt_cert_file)
        if self.connection == "device" and any(v is not None for v in shared_only):
            raise ValueError(
                "broker credentials are for shared connections; a device connection "
                "logs in with its own enrolment certificate"
            )
        if self.connection == "device" and self.mqtts and self.registration != "enrol":
            raise ValueError("device connections over mqtts need certificates: --register enrol")
        return self

    @property
    def mqtts(self) -> bool:
        """True when the broker URL asks for TLS."""
        return urlsplit(self.mqtt_url).scheme in ("mqtts", "ssl")

    def device_ids(self) -> list[str]:
        """The ids of the simulated devices, in order."""
        first = self.first_index
        return [f"{self.id_prefix}-{n:05d}" for n in range(first, first + self.devices)]
