"""The MQTT side of the ingest: a paho-mqtt 2.x client feeding :class:`IngestService`.

Subscriptions (``{p}`` is the topic prefix, ``{g}`` the share group):

=========================  =============================================  ==========
what                       MQTT 5                                         MQTT 3.1.1
=========================  =============================================  ==========
telemetry                  ``$share/{g}/{p}/+/telemetry``                 ``{p}/+/telemetry``
update events              ``$share/{g}/{p}/+/update``                    ``{p}/+/update``
status                     ``{p}/+/status`` (not shared, see below)       ``{p}/+/status``
=========================  =============================================  ==========

Replicas in one share group split telemetry and update events between them. Status is
subscribed without sharing on purpose: brokers do not send retained messages to shared
subscriptions (MQTT 5, section 4.8.2), and the retained status is how a (re)starting
server learns which devices are online. Every replica gets every status; writing one is
idempotent (a status older than the stored one is ignored).

On an MQTT 3.1.1 broker (``protocol: auto`` falls back when the broker refuses MQTT 5)
there are no shared subscriptions: each replica receives everything, so run one replica
per broker or accept duplicate telemetry points. A warning says so.

QoS 1 messages are acknowledged manually, after their batch is committed. With an
explicit ``client_id`` the session is persistent (an hour), so update events sent while
the server restarts are delivered when it is back.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import uuid
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleet_server.config import MqttSettings
from fleet_server.errors import ConfigError
from fleet_server.ingest import IngestService

log = logging.getLogger("fleet_server.ingest.mqtt")

_PROTOCOL_REFUSED = {1, 132}  # 3.1.1 "unacceptable protocol version"; MQTT 5 0x84
SESSION_EXPIRY_S = 3600


def subscriptions(settings: MqttSettings, mqtt5: bool) -> list[str]:
    """The topic filters the ingest subscribes to (see the module docstring)."""
    p, g = settings.topic_prefix, settings.share_group
    shared = [f"{p}/+/telemetry", f"{p}/+/update"]
    if mqtt5:
        shared = [f"$share/{g}/{t}" for t in shared]
    return [*shared, f"{p}/+/status"]


class MqttIngest:
    """Connects to the broker, subscribes, and hands every message to the service."""

    def __init__(self, settings: MqttSettings, service: IngestService) -> None:
        if settings.url is None:
            raise ConfigError("mqtt.url: not set; the ingest needs a broker")
        self.settings = settings
        self.service = service
        url = urlsplit(settings.url)
        self._tls = url.scheme in ("mqtts", "ssl")
        self._host = url.hostname or "localhost"
        self._port = url.port or (8883 if self._tls else 1883)
        self._persistent = settings.client_id is not None
        self._client_id = (
            settings.client_id or f"edge-fleet-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        )
        self.mqtt5 = settings.protocol != "3.1.1"
        self.connected = threading.Event()
        self._client: paho.Client | None = None
        self._lock = threading.Lock()

    @property
    def protocol(self) -> str:
        return "5" if self.mqtt5 else "3.1.1"

    def _make_client(self) -> paho.Client:
        version = paho.MQTTv5 if self.mqtt5 else paho.MQTTv311
        kwargs: dict[str, Any] = {}
        if not self.mqtt5:
            kwargs["clean_session"] = not self._persistent
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self._client_id,
            protocol=version,
            manual_ack=True,
            **kwargs,
        )
        s = self.settings
        if s.username is not None:
            client.username_pw_set(
                s.username, s.password.get_secret_value() if s.password else None
            )
        if self._tls:
            ctx = ssl.create_default_context(cafile=str(s.ca_file) if s.ca_file else None)
            if s.cert_file is not None:
                ctx.load_cert_chain(str(s.cert_file), str(s.key_file) if s.key_file else None)
            client.tls_set_context(ctx)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.reconnect_delay_set(1, 30)
        return client

    def start(self) -> None:
        """Connect in the background (paho retries until the broker answers).

        Raises:
            ConfigError: the TLS files cannot be loaded.
        """
        with self._lock:
            try:
                self._client = self._make_client()
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"mqtt: cannot set up TLS: {exc}") from exc
            self._connect(self._client)

    def _connect(self, client: paho.Client) -> None:
        props = None
        if self.mqtt5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = SESSION_EXPIRY_S if self._persistent else 0
            client.connect_async(
                self._host,
                self._port,
                keepalive=self.settings.keepalive_s,
                clean_start=not self._persistent,
                properties=props,
            )
        else:
            client.connect_async(self._host, self._port, keepalive=self.settings.keepalive_s)
        client.loop_start()

    def stop(self) -> None:
        """Disconnect and stop the network thread."""
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.disconnect()
            client.loop_stop()
        self.connected.clear()

    def wait_connected(self, timeout: float) -> bool:
        """Block until subscribed (or ``timeout`` seconds); ``True`` when connected."""
        return self.connected.wait(timeout)

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> bool:
        """Publish on this client's connection (the rollouts' ``desired`` hints);
        ``False`` when not connected now (the caller keeps the message to retry)."""
        with self._lock:
            client = self._client
        if client is None or not self.connected.is_set():
            return False
        info = client.publish(topic, payload, qos=qos, retain=retain)
        return info.rc == paho.MQTT_ERR_SUCCESS

    # --- paho callbacks (network thread) ---------------------------------------------

    def _on_connect(
        self,
        client: paho.Client,
        _userdata: Any,
        _flags: Any,
        reason: ReasonCode,
        _props: Any,
    ) -> None:
        if reason.is_failure or (not self.mqtt5 and reason.value != 0):
            if (
                self.mqtt5
                and self.settings.protocol == "auto"
                and reason.value in _PROTOCOL_REFUSED
            ):
                log.warning("broker refused MQTT 5; falling back to MQTT 3.1.1")
                threading.Thread(target=self._fallback, name="mqtt-fallback", daemon=True).start()
                return
            log.error("broker refused the connection: %s", reason)
            return
        filters = subscriptions(self.settings, self.mqtt5)
        if self.mqtt5:
            client.subscribe([(f, SubscribeOptions(qos=1)) for f in filters])
        else:
            log.warning("MQTT 3.1.1: no shared subscriptions; every replica receives every message")
            client.subscribe([(f, 1) for f in filters])
        log.info("ingest connected to %s:%d (MQTT %s)", self._host, self._port, self.protocol)
        self.connected.set()

    def _fallback(self) -> None:
        self.stop()
        self.mqtt5 = False
        self.start()

    def _on_disconnect(
        self, _client: paho.Client, _userdata: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        self.connected.clear()
        if reason.value != 0:
            log.warning("ingest lost the broker (%s); reconnecting", reason)

    def _on_message(self, client: paho.Client, _userdata: Any, msg: paho.MQTTMessage) -> None:
        ack = None
        if msg.qos > 0:
            mid, qos = msg.mid, msg.qos

            def ack() -> None:
                client.ack(mid, qos)

        self.service.submit(msg.topic, bytes(msg.payload), retained=bool(msg.retain), ack=ack)
