"""An in-memory broker and transport: the same seam, no network, for fast unit tests.

Several :class:`MemoryTransport` objects share one :class:`MemoryBroker`, which routes
with the same topic matching as a real broker (``+``, ``#``, ``$`` topics), keeps
retained messages (an empty retained payload deletes one), expires them with the MQTT 5
Message Expiry Interval, publishes a client's Last Will when its connection is lost, and
strips MQTT 5 properties on the way to and from a 3.1.1 client.

Delivery is synchronous: handlers run on the publishing thread before ``publish``
returns (the broker's lock is not held while they run). A test therefore needs no
waiting, and must not publish while holding a lock that a handler takes.

Outages are explicit: :meth:`MemoryBroker.go_down` and :meth:`MemoryBroker.go_up` take
the broker away and back (started transports reconnect at ``go_up``, re-subscribe, flush
their queued QoS 1/2 messages and publish their birth), and :meth:`MemoryBroker.drop`
cuts one client's connection, which then reconnects at once if the broker is up.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, replace

from agent.transport.base import MQTT_V5, MQTT_V311, Message, Transport, check_publish
from agent.transport.topics import topic_matches


@dataclass(frozen=True, slots=True)
class _Retained:
    message: Message
    stored_at: float


class MemoryBroker:
    """The shared, in-process broker of a group of :class:`MemoryTransport` objects."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._up = True
        self._connected: list[MemoryTransport] = []
        self._waiting: list[MemoryTransport] = []
        self._retained: dict[str, _Retained] = {}

    @property
    def is_up(self) -> bool:
        """Whether the broker accepts connections now."""
        return self._up

    def retained(self, topic: str) -> Message | None:
        """The retained message on ``topic`` (for assertions), or None."""
        with self._lock:
            entry = self._retained.get(topic)
        return entry.message if entry is not None else None

    def go_down(self) -> None:
        """Lose every connection (Last Wills are stored if retained) and refuse new ones."""
        with self._lock:
            self._up = False
            lost = list(self._connected)
        for transport in lost:
            self._lose(transport)

    def go_up(self) -> None:
        """Accept connections again; every started transport reconnects now."""
        with self._lock:
            self._up = True
            waiting, self._waiting = self._waiting, []
        for transport in waiting:
            transport._attach()

    def drop(self, transport: MemoryTransport) -> None:
        """Cut ``transport``'s connection without DISCONNECT; it reconnects if the broker is up."""
        with self._lock:
            if transport not in self._connected:
                return
        self._lose(transport)
        with self._lock:
            if not self._up:
                return
            self._waiting.remove(transport)
        transport._attach()

    # --- for MemoryTransport ---------------------------------------------------------

    def _join(self, transport: MemoryTransport) -> bool:
        with self._lock:
            if not self._up:
                if transport not in self._waiting:
                    self._waiting.append(transport)
                return False
            self._connected.append(transport)
            return True

    def _leave(self, transport: MemoryTransport, *, publish_will: bool) -> None:
        with self._lock:
            if transport in self._waiting:
                self._waiting.remove(transport)
            if transport not in self._connected:
                return
            self._connected.remove(transport)
        will = transport._will
        if publish_will and will is not None:
            self._route(
                Message(will.topic, will.payload, will.qos, will.retain), transport._protocol
            )

    def _lose(self, transport: MemoryTransport) -> None:
        self._leave(transport, publish_will=True)
        with self._lock:
            self._waiting.append(transport)
        transport._lost()

    def _route(self, message: Message, sender_protocol: int) -> None:
        if sender_protocol == MQTT_V311:
            message = _without_properties(message)
        with self._lock:
            if message.retain:
                if message.payload:
                    self._retained[message.topic] = _Retained(message, time.monotonic())
                else:
                    self._retained.pop(message.topic, None)
            targets = [(t, t._granted_qos(message.topic)) for t in self._connected]
        for transport, granted in targets:
            if granted is not None:
                qos = min(message.qos, granted)
                transport._deliver(replace(message, qos=qos, retain=False))

    def _retained_for(self, topic_filter: str, granted: int) -> list[Message]:
        now = time.monotonic()
        out: list[Message] = []
        with self._lock:
            for topic, entry in list(self._retained.items()):
                if not topic_matches(topic_filter, topic):
                    continue
                message = entry.message
                if message.message_expiry_interval is not None:
                    left = message.message_expiry_interval - int(now - entry.stored_at)
                    if left <= 0:
                        del self._retained[topic]
                        continue
                    message = replace(message, message_expiry_interval=left)
                out.append(replace(message, qos=min(message.qos, granted), retain=True))
        return out


class MemoryTransport(Transport):
    """A :class:`~agent.transport.base.Transport` connected to a :class:`MemoryBroker`."""

    def __init__(
        self,
        broker: MemoryBroker,
        client_id: str,
        *,
        protocol_version: int = MQTT_V5,
        max_queued_messages: int = 1000,
    ) -> None:
        """Raises ValueError: a protocol version other than 5 or 4."""
        super().__init__()
        if protocol_version not in (MQTT_V5, MQTT_V311):
            raise ValueError(f"protocol_version must be 5 or 4, got {protocol_version}")
        self.broker = broker
        self.client_id = client_id
        self._protocol = protocol_version
        self._max_queued = max_queued_messages
        self._started = False
        self._closed = False  # disconnect() was called: publish drops until connect()
        self._queue: deque[Message] = deque()

    def connect(self) -> None:
        """Connect now if the broker is up, else as soon as it comes up."""
        if self._started:
            return
        self._started = True
        self._closed = False
        self._attach()

    def disconnect(self, *, clean: bool = True) -> None:
        """Leave the broker; ``clean=False`` makes it publish the Last Will."""
        self._started = False
        self._closed = True
        was_connected = self.is_connected
        self.broker._leave(self, publish_will=not clean)
        self._connected.clear()
        self._ready.clear()
        if was_connected:
            self._notify_disconnected("disconnected by the client")

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
        """See :meth:`Transport.publish`; delivers synchronously when connected."""
        check_publish(topic, qos, message_expiry_interval)
        message = Message(
            topic,
            bytes(payload),
            qos,
            retain,
            content_type,
            correlation_data,
            response_topic,
            message_expiry_interval,
        )
        if not self.is_connected:
            with self._lock:
                if self._closed or qos == 0 or len(self._queue) >= self._max_queued:
                    return False
                self._queue.append(message)
            return True
        self.broker._route(message, self._protocol)
        return True

    # --- seam -------------------------------------------------------------------------

    def _send_subscribe(self, filters: list[tuple[str, int]]) -> None:
        for topic_filter, qos in filters:
            for message in self.broker._retained_for(topic_filter, qos):
                self._deliver(message)

    def _send_unsubscribe(self, topic_filter: str) -> None:
        """Nothing to send: the broker reads the subscription table directly."""

    # --- broker side ------------------------------------------------------------------

    def _attach(self) -> None:
        if not self._started or not self.broker._join(self):
            return
        self._protocol_version = self._protocol
        self._connected.set()
        self._send_subscribe(self._subscription_list())
        with self._lock:
            queued, self._queue = list(self._queue), deque()
        for message in queued:
            self.broker._route(message, self._protocol)
        self._publish_birth()
        self._ready.set()
        self._notify_connected(self._protocol)

    def _lost(self) -> None:
        self._connected.clear()
        self._ready.clear()
        self._notify_disconnected("connection lost: simulated by the memory broker")

    def _granted_qos(self, topic: str) -> int | None:
        with self._lock:
            granted = [
                s.qos for s in self._subscriptions.values() if topic_matches(s.topic_filter, topic)
            ]
        return max(granted) if granted else None

    def _deliver(self, message: Message) -> None:
        if self._protocol == MQTT_V311:
            message = _without_properties(message)
        self._dispatch(replace(message, received_at=time.monotonic()))


def _without_properties(message: Message) -> Message:
    return replace(
        message,
        content_type=None,
        correlation_data=None,
        response_topic=None,
        message_expiry_interval=None,
    )
