"""The MQTT transport on paho-mqtt 2.x (``CallbackAPIVersion.VERSION2``).

Threads. paho's own network thread (``loop_start``) does all socket I/O, calls every
callback, runs subscription handlers, and reconnects by itself. The transport starts no
thread of its own.

Reconnection. paho's built-in delay is switched off (``reconnect_delay_set(0, 0)``);
instead, when a connection or an attempt ends, the disconnect callback waits a jittered
exponential delay (:class:`~agent.transport.backoff.Backoff`) on the network thread, which
has nothing else to do while the connection is down. After each CONNACK the transport
re-subscribes every filter and flushes what was published before the first connection;
once the SUBACK is in (so after paho has re-sent what the last connection left unacknowledged)
it publishes the birth message, marks itself ready and calls the connect listeners.

Protocol. ``protocol: auto`` connects with MQTT 5. If the broker refuses it (CONNACK
"unsupported protocol version", in either the 5 or the 3.1.1 packet format) or closes
the connection without any CONNACK, the transport tries MQTT 3.1.1 at once. Whichever
version first gets a successful CONNACK is kept for the life of the transport. A paho
client speaks one version, so switching means building a new client; that is why
messages published before the first connection wait in the transport's own queue.

Offline queue. QoS 1/2 messages published while disconnected stay in paho's memory and
are sent after the reconnect, at most ``max_queued_messages`` of them (in flight
included); beyond that ``publish`` returns False. QoS 0 messages are dropped while
disconnected. Nothing survives a restart: the telemetry outbox keeps what must not be
lost.

Secrets. The password goes only to paho; it is never logged, and the config holds it as
a ``SecretStr``.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from collections import deque
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from agent.transport.backoff import Backoff
from agent.transport.base import MQTT_V5, MQTT_V311, Transport, check_publish
from agent.transport.config import MqttConfig
from agent.transport.negotiation import NextAttempt, ProtocolChooser
from agent.transport.paho_codec import Outgoing, from_paho, publish_properties
from agent.transport.tls import build_ssl_context

log = logging.getLogger("agent.transport.mqtt")

#: A connection that stayed up this long resets the backoff to its first step.
STABLE_AFTER_S = 10.0


class MqttTransport(Transport):
    """A :class:`~agent.transport.base.Transport` over a real broker (see the module doc)."""

    def __init__(self, config: MqttConfig) -> None:
        """Raises ConfigError: TLS files that are missing or invalid (see tls.build_ssl_context)."""
        super().__init__()
        self._config = config
        self._address = config.address
        self._where = f"{self._address.host}:{self._address.port}"
        self._ssl_context = build_ssl_context(config.tls) if self._address.tls else None
        self._backoff = Backoff(config.reconnect.min_s, config.reconnect.max_s)
        self._chooser = ProtocolChooser(config.protocol)
        self._client: paho.Client | None = None
        self._live = False  # the current client has had a successful CONNACK
        self._pending: deque[Outgoing] = deque()
        self._stop = threading.Event()
        self._connected_at = 0.0
        self._refusal: ReasonCode | None = None
        self._suback_wait: dict[int, tuple[list[tuple[str, int]], bool]] = {}
        self._refused_filters: set[str] = set()
        #: Why the last connection or attempt ended (one line, no secrets); None while up.
        self._last_error: str | None = None

    # --- public ---------------------------------------------------------------------

    @property
    def socket(self) -> socket.socket | None:
        """The live socket (for diagnostics such as checking TCP_NODELAY), or None."""
        client = self._client
        sock = client.socket() if client is not None else None
        return sock if isinstance(sock, socket.socket) else None

    @property
    def last_error(self) -> str | None:
        """Why the last connection or attempt ended: one line, no secrets; None while up."""
        return self._last_error

    @property
    def refused_subscriptions(self) -> frozenset[str]:
        """Filters the broker refused in its last SUBACK for them (e.g. not authorised)."""
        with self._lock:
            return frozenset(self._refused_filters)

    def connect(self) -> None:
        """Start connecting in paho's network thread and return at once.

        Calling it while already started does nothing; after :meth:`disconnect` it starts
        again (keeping the protocol version that worked).
        """
        with self._lock:
            if self._client is not None:
                return
            self._stop.clear()
            self._start_client(self._chooser.first)

    def disconnect(self, *, clean: bool = True) -> None:
        """Stop reconnecting and close the connection; returns once paho's thread ended.

        With ``clean=True``, messages already handed to the socket (a final status, say) go
        out before DISCONNECT. With ``clean=False`` the socket is shut down without
        DISCONNECT, so the broker publishes the Last Will. May block up to
        ``connect_timeout_s`` when a connection attempt is under way.
        """
        with self._lock:
            self._stop.set()
            client, self._client = self._client, None
            self._live = False
        if client is None:
            return
        if clean:
            client.disconnect()
        else:
            _drop(client)
        client.loop_stop()
        # A connection that came up while stopping: with the loop gone, paho writes the
        # DISCONNECT itself (a no-op once the socket is closed).
        if clean:
            client.disconnect()
        else:
            _drop(client)
        self._connected.clear()
        self._ready.clear()

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 0,
        retain: bool = False,
        content_type: str | None = None,
        correlation_data: bytes | None = None,
        response_topic: str | None = None,
        message_expiry_interval: int | None = None,
    ) -> bool:
        """See :meth:`Transport.publish`. Never blocks on the network."""
        check_publish(topic, qos, message_expiry_interval)
        out = Outgoing(
            topic,
            bytes(payload),
            qos,
            retain,
            content_type,
            correlation_data,
            response_topic,
            message_expiry_interval,
        )
        with self._lock:
            if self._stop.is_set():
                return False
            client = self._client if self._live else None
            if client is None:  # not connected yet: hold it until the first CONNACK
                if qos == 0 or len(self._pending) >= self._config.max_queued_messages:
                    return False
                self._pending.append(out)
                return True
        return self._send(client, out)

    # --- paho plumbing --------------------------------------------------------------

    def _start_client(self, version: int) -> None:
        """Build a paho client for ``version`` and start its network thread (lock held)."""
        cfg = self._config
        v5 = version == MQTT_V5
        client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=cfg.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else cfg.clean_start,
        )
        client.suppress_exceptions = True  # a failing callback must not end the loop...
        client.on_log = _on_paho_log  # ...and is logged as an error there
        client.connect_timeout = cfg.connect_timeout_s
        client.reconnect_delay_set(0, 0)  # the transport waits itself, with jitter
        client.max_queued_messages_set(cfg.max_queued_messages)
        client.max_inflight_messages_set(cfg.max_inflight_messages)
        if cfg.username is not None:
            secret = cfg.password.get_secret_value() if cfg.password is not None else None
            client.username_pw_set(cfg.username, secret)
        if self._ssl_context is not None:
            client.tls_set_context(self._ssl_context)
            if cfg.tls is not None and cfg.tls.insecure:
                client.tls_insecure_set(True)
        will = self._will
        if will is not None:
            client.will_set(will.topic, will.payload, will.qos, will.retain)
        client.on_socket_open = self._on_socket_open
        client.on_connect = self._on_connect
        client.on_connect_fail = self._on_connect_fail
        client.on_disconnect = self._on_disconnect
        client.on_subscribe = self._on_subscribe
        client.on_message = self._on_message
        properties = None
        if v5 and not cfg.clean_start:
            properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            properties.SessionExpiryInterval = cfg.session_expiry_s
        client.connect_async(
            self._address.host,
            self._address.port,
            cfg.keepalive,
            clean_start=cfg.clean_start if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
        )
        self._client = client
        self._live = False
        log.info("connecting to %s as %r (MQTT %s)", self._where, cfg.client_id, _name(version))
        client.loop_start()

    def _send(self, client: paho.Client, out: Outgoing) -> bool:
        properties = None
        if client.protocol == paho.MQTTv5:
            properties = publish_properties(out)
        info = client.publish(out.topic, out.payload, out.qos, out.retain, properties)
        if info.rc == MQTTErrorCode.MQTT_ERR_SUCCESS:
            return True
        # QoS > 0 while disconnected: paho keeps the message and sends it after reconnecting.
        return out.qos > 0 and info.rc == MQTTErrorCode.MQTT_ERR_NO_CONN

    def _send_subscribe(self, filters: list[tuple[str, int]], *, marks_ready: bool = False) -> None:
        with self._lock:
            client = self._client
            if client is None:
                return
            rc, mid = client.subscribe(filters)
            if rc == MQTTErrorCode.MQTT_ERR_SUCCESS and mid is not None:
                self._suback_wait[mid] = (filters, marks_ready)

    def _send_unsubscribe(self, topic_filter: str) -> None:
        client = self._client
        if client is not None:
            client.unsubscribe(topic_filter)

    def _on_socket_open(self, client: paho.Client, userdata: Any, sock: Any) -> None:
        if self._config.tcp_nodelay and isinstance(sock, socket.socket):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def _on_connect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.ConnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if self._stop.is_set():
            client.disconnect()
            return
        if client is not self._client:
            return
        if reason_code.is_failure:
            self._refusal = reason_code  # paho closes the connection next: see _on_disconnect
            return
        version = MQTT_V5 if client.protocol == paho.MQTTv5 else MQTT_V311
        with self._lock:
            self._last_error = None
            self._chooser.connected(version)
            self._protocol_version = version
            self._connected_at = time.monotonic()
            self._live = True
            self._connected.set()
            self._suback_wait.clear()  # SUBACKs of a lost connection never come
            filters = self._subscription_list()
            if filters:
                self._send_subscribe(filters, marks_ready=True)
            while self._pending:
                self._send(client, self._pending.popleft())
        log.info("connected to %s with MQTT %s", self._where, _name(version))
        if not filters:
            self._connection_ready(version)

    def _connection_ready(self, version: int) -> None:
        """Birth, readiness, listeners: after the SUBACK of the re-subscription.

        paho re-sends the QoS 1/2 messages left over from the last connection only after
        the connect callback returns; waiting for the SUBACK puts the birth after them, so
        a stale retained status can never overwrite the fresh one.
        """
        self._publish_birth()
        self._ready.set()
        self._notify_connected(version)

    def _on_connect_fail(self, client: paho.Client, userdata: Any) -> None:
        if client is not self._client:
            return
        self._last_error = f"cannot reach the broker at {self._where}"
        log.info("%s", self._last_error)
        self._after_attempt(client, was_connected=False, reached=False)

    def _on_disconnect(
        self,
        client: paho.Client,
        userdata: Any,
        flags: paho.DisconnectFlags,
        reason_code: ReasonCode,
        properties: Properties | None,
    ) -> None:
        if client is not self._client and not self._stop.is_set():
            return
        was_connected = self._connected.is_set()
        self._connected.clear()
        self._ready.clear()
        refusal, self._refusal = self._refusal, None
        if self._stop.is_set():
            client.loop_stop()  # from paho's own thread: ends the loop, does not join
            if was_connected:
                self._notify_disconnected("disconnected by the client")
            return
        if refusal is not None:
            self._last_error = f"the broker at {self._where} refused the connection: {refusal}"
            falling_back = self._config.protocol == "auto" and refusal.value == 0x84
            log.log(logging.INFO if falling_back else logging.WARNING, "%s", self._last_error)
        elif was_connected:
            side = "closed by the broker" if flags.is_disconnect_packet_from_server else "lost"
            self._last_error = f"connection to {self._where} {side}: {reason_code}"
            log.warning("%s", self._last_error)
            self._notify_disconnected(self._last_error)
        else:
            self._last_error = f"the broker at {self._where} closed the connection before CONNACK"
            log.info("%s", self._last_error)
        self._after_attempt(client, was_connected, reached=True, refusal=refusal)

    def _after_attempt(
        self,
        client: paho.Client,
        was_connected: bool,
        reached: bool,
        refusal: ReasonCode | None = None,
    ) -> None:
        """Pick the next protocol version and wait before paho's next attempt."""
        if was_connected and time.monotonic() - self._connected_at >= STABLE_AFTER_S:
            self._backoff.reset()
        current = MQTT_V5 if client.protocol == paho.MQTTv5 else MQTT_V311
        if was_connected:
            nxt = NextAttempt(current, at_once=False)
        else:
            code = refusal.value if refusal is not None else None
            nxt = self._chooser.after_failure(current, reached=reached, refusal_code=code)
        if nxt.version != current:
            log.info("trying MQTT %s with the broker at %s", _name(nxt.version), self._where)
        if not nxt.at_once:
            delay = self._backoff.next_delay()
            log.info("next attempt to reach %s in %.2f s", self._where, delay)
            if self._stop.wait(delay):
                client.loop_stop()
                return
        if nxt.version != current:
            client.loop_stop()  # ends this client's thread once this callback returns
            with self._lock:
                if not self._stop.is_set():
                    self._start_client(nxt.version)

    def _on_subscribe(
        self,
        client: paho.Client,
        userdata: Any,
        mid: int,
        reason_codes: list[ReasonCode],
        properties: Properties | None,
    ) -> None:
        with self._lock:
            entry = self._suback_wait.pop(mid, None)
            if entry is None:
                return
            filters, marks_ready = entry
            for (topic_filter, _qos), code in zip(filters, reason_codes, strict=False):
                if code.is_failure:
                    self._refused_filters.add(topic_filter)
                    log.warning("the broker refused the subscription %r: %s", topic_filter, code)
                else:
                    self._refused_filters.discard(topic_filter)
        if marks_ready and client is self._client:
            self._connection_ready(MQTT_V5 if client.protocol == paho.MQTTv5 else MQTT_V311)

    def _on_message(self, client: paho.Client, userdata: Any, msg: paho.MQTTMessage) -> None:
        message = from_paho(msg)
        if message is None:
            log.warning("dropped a message whose topic is not UTF-8")
            return
        self._dispatch(message)


def _on_paho_log(client: paho.Client, userdata: Any, level: int, buf: str) -> None:
    # paho reports "Client is not connected" as an error on every failed reconnection
    # attempt; only exceptions caught in callbacks are errors of ours.
    if buf.startswith("Caught exception"):
        log.error("paho: %s", buf)
    else:
        log.debug("paho: %s", buf)


def _drop(client: paho.Client) -> None:
    """Shut the client's TCP stream without DISCONNECT (TLS state is left alone)."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        with contextlib.suppress(OSError):
            socket.socket.shutdown(sock, socket.SHUT_RDWR)


def _name(version: int) -> str:
    return "5" if version == MQTT_V5 else "3.1.1"
