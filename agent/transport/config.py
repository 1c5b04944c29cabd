"""Typed config of the MQTT transport (the ``mqtt:`` section of the agent config).

Plain pydantic, no paho: the config can be validated where paho is not installed. A
malformed broker URL raises :class:`agent.errors.ConfigError` from the model itself;
files named under ``tls`` are checked when the transport is built (see
:func:`agent.transport.mqtt.build_ssl_context`), so a config can be validated on a
machine that does not hold the device's keys.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from agent.errors import ConfigError

_DEFAULT_PORTS = {"mqtt": 1883, "mqtts": 8883}


@dataclass(frozen=True, slots=True)
class BrokerAddress:
    """Where the broker listens, parsed from an ``mqtt://`` or ``mqtts://`` URL."""

    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://host[:port]`` (default port 1883) or ``mqtts://host[:port]`` (8883).

    Raises:
        ConfigError: another scheme, no host, a bad port, or a path, query or user part.
    """
    shown = _redacted(url)
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"mqtt.url {shown!r}: {exc}") from None
    if parts.scheme not in _DEFAULT_PORTS:
        raise ConfigError(f"mqtt.url {shown!r}: the scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ConfigError(f"mqtt.url {shown!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"mqtt.url {shown!r}: a broker URL has no path, query or fragment")
    if parts.username is not None or parts.password is not None:
        raise ConfigError("mqtt.url: put credentials in mqtt.username and mqtt.password")
    if port == 0:
        raise ConfigError(f"mqtt.url {shown!r}: port 0 is not a broker port")
    return BrokerAddress(
        host=parts.hostname,
        port=port if port is not None else _DEFAULT_PORTS[parts.scheme],
        tls=parts.scheme == "mqtts",
    )


def _redacted(url: str) -> str:
    """``url`` with any ``user:password@`` part replaced, for error messages."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest.split("/", 1)[0]:
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsConfig(_Strict):
    """TLS settings; required for ``mqtts://`` with a private CA or client certificates."""

    #: The CA bundle that signed the broker's certificate; None uses the system CAs.
    ca_file: Path | None = None
    #: The client certificate (its CN is the device id when the broker maps identity
    #: to username) and its private key. Both or neither.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: Skip the check that the broker's certificate names the host. The chain is still
    #: verified. Only for test set-ups; never in production.
    insecure: bool = False

    @model_validator(mode="after")
    def _cert_and_key_together(self) -> TlsConfig:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("tls.cert_file and tls.key_file must be given together")
        return self


class ReconnectConfig(_Strict):
    """Exponential backoff between connection attempts, with jitter."""

    #: The first delay, in seconds.
    min_s: float = Field(1.0, gt=0, le=3600)
    #: The longest delay, in seconds; the doubling stops there.
    max_s: float = Field(60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _ordered(self) -> ReconnectConfig:
        if self.min_s > self.max_s:
            raise ValueError("reconnect.min_s must not exceed reconnect.max_s")
        return self


class MqttConfig(_Strict):
    """How the agent reaches its broker.

    ``protocol: auto`` connects with MQTT 5 and falls back to 3.1.1 when the broker
    refuses MQTT 5; the version that worked is kept for the life of the process.
    """

    url: str
    client_id: str = Field(min_length=1, max_length=128)
    username: str | None = Field(None, min_length=1)
    password: SecretStr | None = None
    tls: TlsConfig | None = None
    keepalive: int = Field(30, ge=5, le=65535)
    protocol: Literal["auto", "5", "3.1.1"] = "auto"
    reconnect: ReconnectConfig = ReconnectConfig()
    #: Start a new session on every connection (the transport re-subscribes anyway).
    #: With False, MQTT 5 asks the broker to keep the session ``session_expiry_s``.
    clean_start: bool = True
    session_expiry_s: int = Field(3600, ge=0, le=2**32 - 1)
    #: The most QoS 1/2 messages held in memory for sending (in flight, or waiting for a
    #: reconnect). Beyond it, ``publish`` returns False. The queue does not survive a
    #: restart: telemetry that must not be lost goes through the on-disk outbox.
    max_queued_messages: int = Field(10_000, ge=1, le=1_000_000)
    #: QoS 1/2 messages in flight (sent, not yet acknowledged) before paho queues more.
    max_inflight_messages: int = Field(200, ge=1, le=65_535)
    #: Seconds to wait for the TCP (and TLS) connection to open.
    connect_timeout_s: float = Field(10.0, gt=0, le=300)
    #: Disable Nagle's algorithm on the socket (request/reply latency).
    tcp_nodelay: bool = True

    @field_validator("url")
    @classmethod
    def _url_parses(cls, url: str) -> str:
        parse_broker_url(url)  # raises ConfigError, which pydantic lets through as is
        return url

    @field_validator("client_id")
    @classmethod
    def _client_id_printable(cls, client_id: str) -> str:
        if not client_id.isprintable() or any(c in client_id for c in "+#/"):
            raise ValueError("client_id must be printable and contain no '+', '#' or '/'")
        return client_id

    @model_validator(mode="after")
    def _consistent(self) -> MqttConfig:
        if self.password is not None and self.username is None:
            raise ValueError("mqtt.password is set but mqtt.username is not")
        if self.tls is not None and not self.address.tls:
            raise ValueError("mqtt.tls is set but the url is mqtt:// (use mqtts://)")
        return self

    @property
    def address(self) -> BrokerAddress:
        """The parsed :attr:`url`."""
        return parse_broker_url(self.url)
