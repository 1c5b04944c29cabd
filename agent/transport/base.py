"""The transport seam: what the daemon needs from an MQTT connection, and nothing more.

:class:`Transport` is an abstract base class. It holds what every transport does the
same way (the subscription table, the Last Will, the birth message, listener lists,
dispatch of incoming messages to handlers) and leaves the network to subclasses:
:class:`agent.transport.mqtt.MqttTransport` (paho-mqtt, a real broker) and
:class:`agent.transport.memory.MemoryTransport` (an in-process fake for unit tests).

Threading: handlers and connect/disconnect listeners run on the transport's network
thread. They must be cheap and must not block (hand work off to a queue); an exception
they raise is logged and swallowed, never allowed to stop the network thread.
``publish``, ``subscribe`` and ``unsubscribe`` may be called from any thread, including
from a handler.
"""

from __future__ import annotations

import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.transport.topics import topic_matches, validate_topic_filter, validate_topic_name

log = logging.getLogger("agent.transport")

#: MQTT protocol levels as they appear in CONNECT: 5 is MQTT 5.0, 4 is MQTT 3.1.1.
MQTT_V5 = 5
MQTT_V311 = 4


@dataclass(frozen=True, slots=True)
class Message:
    """One incoming message, as handed to a subscription handler.

    The four MQTT 5 properties are ``None`` when the message did not carry them (always
    on an MQTT 3.1.1 connection). ``message_expiry_interval`` is what the broker sent:
    the publisher's interval minus the time the message waited in the broker, in
    seconds. ``received_at`` is ``time.monotonic()`` when the transport received it.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    content_type: str | None = None
    correlation_data: bytes | None = None
    response_topic: str | None = None
    message_expiry_interval: int | None = None
    received_at: float = field(default_factory=time.monotonic)


#: A subscription handler. Runs on the network thread: keep it short, never block.
Handler = Callable[[Message], None]
#: Called after each successful (re)connection with the protocol level in use (5 or 4).
ConnectListener = Callable[[int], None]
#: Called when a connection that was up ends, with a one-line reason.
DisconnectListener = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class Will:
    """The Last Will the broker publishes when the connection drops without DISCONNECT."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class Birth:
    """A message published after every successful (re)connection.

    ``make_payload`` is called at each connection, so the payload can be fresh (the
    agent's status document carries a timestamp).
    """

    topic: str
    make_payload: Callable[[], bytes]
    qos: int = 1
    retain: bool = True


@dataclass(frozen=True, slots=True)
class _Subscription:
    topic_filter: str
    qos: int
    handler: Handler


def check_qos(qos: int) -> int:
    """Return ``qos`` if it is 0, 1 or 2.

    Raises:
        ValueError: any other value.
    """
    if qos not in (0, 1, 2):
        raise ValueError(f"qos must be 0, 1 or 2, got {qos!r}")
    return qos


class Transport(ABC):
    """An MQTT client connection, as the daemon sees it.

    Typical use::

        transport.set_will("edge/cam-01/status", offline_json)
        transport.set_birth("edge/cam-01/status", make_status_json)
        transport.subscribe("edge/cam-01/infer/+", 1, on_request)
        transport.connect()            # returns at once; connects in the background
        transport.wait_connected(10)   # optional
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._subscriptions: dict[str, _Subscription] = {}
        self._connect_listeners: list[ConnectListener] = []
        self._disconnect_listeners: list[DisconnectListener] = []
        self._will: Will | None = None
        self._birth: Birth | None = None
        self._connected = threading.Event()
        self._ready = threading.Event()
        self._protocol_version: int | None = None

    # --- state ----------------------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """Whether a connection is up now (CONNACK received, not yet lost)."""
        return self._connected.is_set()

    @property
    def protocol_version(self) -> int | None:
        """The protocol level of the current or last connection: 5 (MQTT 5) or 4 (3.1.1).

        ``None`` until the first successful connection.
        """
        return self._protocol_version

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected, re-subscribed (SUBACK in) and the birth sent; False on timeout."""
        return self._ready.wait(timeout)

    # --- set-up ---------------------------------------------------------------------

    def set_will(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = True) -> None:
        """Set the Last Will; it takes effect at the next connection attempt.

        Raises:
            ValueError: an invalid topic or QoS.
        """
        self._will = Will(validate_topic_name(topic), bytes(payload), check_qos(qos), retain)

    def set_birth(
        self,
        topic: str,
        make_payload: Callable[[], bytes],
        *,
        qos: int = 1,
        retain: bool = True,
    ) -> None:
        """Publish ``make_payload()`` to ``topic`` after every successful (re)connection.

        It is published after the subscriptions are re-sent, so whoever sees it knows the
        client is listening again.

        Raises:
            ValueError: an invalid topic or QoS.
        """
        self._birth = Birth(validate_topic_name(topic), make_payload, check_qos(qos), retain)

    def on_connect(self, listener: ConnectListener) -> None:
        """Register ``listener(protocol_version)``, called after each successful connection."""
        with self._lock:
            self._connect_listeners.append(listener)

    def on_disconnect(self, listener: DisconnectListener) -> None:
        """Register ``listener(reason)``, called when a connection that was up ends."""
        with self._lock:
            self._disconnect_listeners.append(listener)

    # --- subscriptions --------------------------------------------------------------

    def subscribe(self, topic_filter: str, qos: int, handler: Handler) -> None:
        """Deliver messages matching ``topic_filter`` to ``handler``, now and after reconnects.

        Subscribing again to the same filter replaces its QoS and handler. A message that
        matches several filters is handed to each of their handlers; avoid overlapping
        filters on one transport (a broker may also send such a message more than once).

        Raises:
            ValueError: an invalid topic filter or QoS.
        """
        sub = _Subscription(validate_topic_filter(topic_filter), check_qos(qos), handler)
        with self._lock:
            self._subscriptions[topic_filter] = sub
        if self.is_connected:
            self._send_subscribe([(topic_filter, qos)])

    def unsubscribe(self, topic_filter: str) -> None:
        """Stop delivering ``topic_filter``; a filter that was not subscribed is ignored."""
        with self._lock:
            removed = self._subscriptions.pop(topic_filter, None)
        if removed is not None and self.is_connected:
            self._send_unsubscribe(topic_filter)

    # --- network (subclasses) ---------------------------------------------------------

    @abstractmethod
    def connect(self) -> None:
        """Start connecting in the background and return at once; reconnects by itself."""

    @abstractmethod
    def disconnect(self, *, clean: bool = True) -> None:
        """Close the connection and stop reconnecting.

        ``clean=True`` sends DISCONNECT, so the broker discards the Last Will.
        ``clean=False`` drops the connection without it, so the broker publishes the
        Last Will (what a crash or a pulled cable looks like to the broker).
        """

    @abstractmethod
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
        """Publish without blocking on the network.

        The four properties are sent on MQTT 5 and dropped on 3.1.1 (the protocol layer
        then carries them in the JSON body). Returns True when the message was sent, or
        queued to be sent after a reconnect (QoS 1 and 2); False when it was dropped
        (QoS 0 while disconnected, or the offline queue is full).

        Raises:
            ValueError: an invalid topic, QoS or property.
        """

    @abstractmethod
    def _send_subscribe(self, filters: list[tuple[str, int]]) -> None:
        """Send SUBSCRIBE for ``filters`` on the current connection."""

    @abstractmethod
    def _send_unsubscribe(self, topic_filter: str) -> None:
        """Send UNSUBSCRIBE for ``topic_filter`` on the current connection."""

    # --- helpers for subclasses (network thread) --------------------------------------

    def _subscription_list(self) -> list[tuple[str, int]]:
        with self._lock:
            return [(s.topic_filter, s.qos) for s in self._subscriptions.values()]

    def _publish_birth(self) -> None:
        birth = self._birth
        if birth is None:
            return
        try:
            payload = birth.make_payload()
        except Exception:
            log.exception("birth payload for %s failed; not published", birth.topic)
            return
        self.publish(birth.topic, payload, qos=birth.qos, retain=birth.retain)

    def _notify_connected(self, protocol_version: int) -> None:
        with self._lock:
            listeners = list(self._connect_listeners)
        for listener in listeners:
            try:
                listener(protocol_version)
            except Exception:
                log.exception("connect listener %r failed", listener)

    def _notify_disconnected(self, reason: str) -> None:
        with self._lock:
            listeners = list(self._disconnect_listeners)
        for listener in listeners:
            try:
                listener(reason)
            except Exception:
                log.exception("disconnect listener %r failed", listener)

    def _dispatch(self, message: Message) -> None:
        """Hand ``message`` to the handler of every subscription whose filter matches."""
        with self._lock:
            handlers = [
                s.handler
                for s in self._subscriptions.values()
                if topic_matches(s.topic_filter, message.topic)
            ]
        for handler in handlers:
            try:
                handler(message)
            except Exception:
                log.exception("handler %r failed on a message to %s", handler, message.topic)


def check_publish(topic: str, qos: int, message_expiry_interval: int | None) -> None:
    """Validate the arguments of :meth:`Transport.publish`.

    Raises:
        ValueError: an invalid topic name, QoS, or expiry interval outside 0..2**32-1.
    """
    validate_topic_name(topic)
    check_qos(qos)
    if message_expiry_interval is not None and not 0 <= message_expiry_interval < 2**32:
        raise ValueError(f"message_expiry_interval out of range: {message_expiry_interval}")
