"""Typed configuration of the server and of the ``edge-fleet`` CLI client.

The server reads an optional YAML file (``edge-fleet serve --config server.yaml``); command
line flags override it. Every model forbids unknown keys, so a typo fails at start-up
with the key named, instead of being silently ignored.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator
from pydantic import ValidationError as PydanticValidationError

from fleet_server.errors import ConfigError

DEFAULT_URL = "http://127.0.0.1:8080"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MqttSettings(_Strict):
    """How the server's ingest connects to the broker."""

    #: ``mqtt://host:1883`` or ``mqtts://host:8883``; ``None`` turns ingest off.
    url: str | None = None
    topic_prefix: str = Field(default="edge", pattern=r"^[A-Za-z0-9_./-]{1,64}$")
    #: MQTT 5 shared-subscription group: replicas in one group split the messages.
    share_group: str = Field(default="fleet", pattern=r"^[A-Za-z0-9_.-]{1,64}$")
    client_id: str | None = None
    username: str | None = None
    password: SecretStr | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    #: ``auto`` tries MQTT 5 and falls back to 3.1.1 (plain subscriptions, logged).
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    keepalive_s: int = Field(default=30, ge=5, le=3600)

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str | None) -> str | None:
        if value is not None and urlsplit(value).scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError("expected mqtt://host[:port] or mqtts://host[:port]")
        return value


class IngestSettings(_Strict):
    """Batching and flood control of the MQTT ingest."""

    #: The writer commits what is queued this often, in one transaction.
    flush_interval_ms: int = Field(default=150, ge=10, le=5000)
    max_batch: int = Field(default=2000, ge=1, le=50_000)
    #: Messages waiting for the writer; over it, messages are dropped and counted.
    queue_max: int = Field(default=50_000, ge=100)
    #: Token bucket per device: sustained messages per second, and the burst allowed.
    device_rate_per_s: float = Field(default=5.0, gt=0)
    device_burst: int = Field(default=50, ge=1)
    max_payload_bytes: int = Field(default=256 * 1024, ge=1024)
    #: Create an inventory row for a device first heard of on the broker (the broker
    #: authorised its topic). When off, such messages are dropped and counted.
    auto_register: bool = True


class TelemetrySettings(_Strict):
    """Device liveness and time-series retention."""

    interval_s: float = Field(default=10.0, gt=0)
    #: A device silent for this many intervals is shown as ``stale``.
    stale_after_intervals: int = Field(default=3, ge=1)
    raw_retention_h: float = Field(default=24.0, gt=0)
    minute_retention_h: float = Field(default=7 * 24.0, gt=0)
    five_minute_retention_h: float = Field(default=90 * 24.0, gt=0)
    maintenance_interval_s: float = Field(default=300.0, ge=1)


class EnrolmentSettings(_Strict):
    """What a device gets back when it enrols."""

    #: The broker URL handed to devices (may differ from the server's own ``mqtt.url``).
    broker_url: str | None = None
    #: The server URL devices use for updates (``None``: derived from the request).
    public_url: str | None = None
    max_token_ttl_s: int = Field(default=7 * 24 * 3600, ge=60)
    #: Broker identities that are not devices (see ``scripts/mosquitto/acl``): a device can
    #: never enrol under one of these ids, or any id starting with a reserved prefix, since
    #: its certificate's CN would carry that identity's broker rights.
    reserved_ids: tuple[str, ...] = ("fleet-server",)
    reserved_prefixes: tuple[str, ...] = ("app-",)


class CaSettings(_Strict):
    """The device CA's revocation list, as the broker reads it."""

    #: A copy of the CRL for the broker (Mosquitto ``crlfile``), written (mode 0644) at
    #: start-up, on every revocation and every ``crl_refresh_s``. ``None``: only
    #: ``{data_dir}/ca/crl.pem`` is written (and that folder is private).
    crl_file: Path | None = None
    #: How often the CRL is re-signed; it is valid ``crl_validity_days``, and a broker
    #: refuses every client once its CRL has expired.
    crl_refresh_s: float = Field(default=6 * 3600.0, ge=1)
    crl_validity_days: int = Field(default=7, ge=1, le=365)


class TufSettings(_Strict):
    """Serving and refreshing the signed update metadata."""

    #: How often the image repository's online roles are re-signed when past half-life.
    refresh_interval_s: float = Field(default=300.0, ge=1)
    #: When set, ``/tuf/director/{device}/`` answers only requests that carry this header
    #: with the device id as its value: the CN of the client certificate that a
    #: TLS-terminating proxy in front of the server verified (nginx:
    #: ``proxy_set_header X-Client-CN $ssl_client_s_dn_cn``). The proxy must strip the
    #: header from what clients send. ``None``: director metadata is public (it is signed
    #: and names the device, so it can be neither forged nor replayed to another device).
    director_client_cn_header: str | None = Field(default=None, pattern=r"^[A-Za-z0-9-]{1,64}$")


class ValidationSettings(_Strict):
    """How uploaded bundles are checked before they are stored."""

    #: ``process``: in a worker process, so a crashing model cannot take the server down.
    isolation: Literal["process", "inline"] = "process"
    timeout_s: float = Field(default=120.0, gt=0)


class EngineSettings(_Strict):
    """The rollout reconciler: how often it ticks and how much one tick does."""

    interval_s: float = Field(default=1.0, gt=0, le=600)
    #: Devices one rollout assigns (or moves back) per tick: bounds a transaction. A tick
    #: that fills its batch is followed at once by another (at most 20 in a row).
    batch_size: int = Field(default=1000, ge=1, le=50_000)
    #: Hints published per tick.
    hint_batch: int = Field(default=2000, ge=1)


class ServerSettings(_Strict):
    """Everything ``edge-fleet serve`` needs."""

    data_dir: Path = Path("edge-fleet-data")
    #: ``sqlite:///path.db`` or ``postgresql+psycopg://user@host/db``; default: SQLite
    #: in ``data_dir``.
    database_url: str | None = None
    artifacts_dir: Path | None = None
    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)
    max_upload_bytes: int = Field(default=1024 * 1024 * 1024, ge=1024)
    #: Where the signing side keeps TUF metadata and keys (default ``data_dir/tuf``).
    tuf_dir: Path | None = None
    mqtt: MqttSettings = MqttSettings()
    ingest: IngestSettings = IngestSettings()
    telemetry: TelemetrySettings = TelemetrySettings()
    enrolment: EnrolmentSettings = EnrolmentSettings()
    validation: ValidationSettings = ValidationSettings()
    ca: CaSettings = CaSettings()
    tuf: TufSettings = TufSettings()
    #: The rollout reconciler: tick interval and batch sizes.
    rollouts: EngineSettings = EngineSettings()

    def resolved_database_url(self) -> str:
        """The database URL to use: the configured one, or SQLite under ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'fleet.db').resolve()}"

    def resolved_artifacts_dir(self) -> Path:
        """Where the local artifact store keeps blobs."""
        return self.artifacts_dir or self.data_dir / "artifacts"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        elif value is not None:
            out[key] = value
    return out


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def _describe(exc: PydanticValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    return f"{where}: {first['msg']}"


def load_server_settings(
    config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> ServerSettings:
    """Build the server settings from an optional YAML file plus overrides (CLI flags).

    ``None`` values in ``overrides`` are ignored, so unset flags keep the file's values.

    Raises:
        ConfigError: the file cannot be read or a value is invalid (the key is named).
    """
    data = _read_yaml(config_file) if config_file is not None else {}
    data = _merge(data, overrides or {})
    try:
        return ServerSettings.model_validate(data)
    except PydanticValidationError as exc:
        raise ConfigError(_describe(exc)) from exc


class ClientSettings(_Strict):
    """The CLI's view of the server: where it is and which token to send."""

    url: str = DEFAULT_URL
    token: SecretStr | None = None


def client_config_path() -> Path:
    """``$XDG_CONFIG_HOME/edge-fleet/cli.yaml`` (``~/.config/...`` by default)."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "edge-fleet" / "cli.yaml"


def load_client_settings(env: dict[str, str] | None = None) -> ClientSettings:
    """The CLI settings: ``cli.yaml`` when present, overridden by ``EDGE_FLEET_URL`` and
    ``EDGE_FLEET_TOKEN``.

    Raises:
        ConfigError: ``cli.yaml`` is unreadable or holds an unknown key.
    """
    env = dict(os.environ) if env is None else env
    path = client_config_path()
    data = _read_yaml(path) if path.is_file() else {}
    if env.get("EDGE_FLEET_URL"):
        data["url"] = env["EDGE_FLEET_URL"]
    if env.get("EDGE_FLEET_TOKEN"):
        data["token"] = env["EDGE_FLEET_TOKEN"]
    try:
        return ClientSettings.model_validate(data)
    except PydanticValidationError as exc:
        raise ConfigError(f"{path}: {_describe(exc)}") from exc
