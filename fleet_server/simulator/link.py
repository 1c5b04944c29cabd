"""MQTT for thousands of simulated devices in one asyncio loop.

Each connection is a paho-mqtt 2.x client driven by paho's external-loop API: its socket
is watched by the asyncio loop (``add_reader``/``add_writer`` call ``loop_read`` and
``loop_write``) and one task calls ``loop_misc`` (keep-alive) on every client in turn. No
thread per client and one file descriptor per connection, so a process holds ten
thousand connections within the default limit of open files it raises to the hard one.

:class:`Connection` is one such client: MQTT 5, clean start, reconnects with backoff after
an unexpected loss (the broker restarted), at most ``connect_rate`` connects a second
across the fleet. A device's own connection carries its Last Will; :meth:`drop` ends it
with reason code 0x04 "disconnect with Will message", so the broker publishes the Will
exactly as when a device loses power or its link.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger("fleet_server.simulator.link")

#: DISCONNECT reason 0x04: the broker publishes the Will (MQTT 5, 3.14.2.1).
_WITH_WILL = 4
_BACKOFF_MAX_S = 30.0


class RateGate:
    """At most ``rate`` passes a second, spaced evenly (connects to the broker)."""

    def __init__(self, rate: float) -> None:
        self._interval = 1.0 / rate
        self._next = 0.0

    async def wait(self) -> None:
        """Return when the next pass is due."""
        loop = asyncio.get_running_loop()
        now = loop.time()
        at = max(now, self._next)
        self._next = at + self._interval
        if at > now:
            await asyncio.sleep(at - now)


class LoopBridge:
    """Runs paho clients on an asyncio loop, and their keep-alive."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.clients: set[paho.Client] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    def attach(self, client: paho.Client) -> None:
        """Have the loop drive ``client``'s socket from now on."""
        client.on_socket_open = self._opened
        client.on_socket_close = self._closed
        client.on_socket_register_write = self._want_write
        client.on_socket_unregister_write = self._written
        self.clients.add(client)

    def detach(self, client: paho.Client) -> None:
        self.clients.discard(client)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task that is kept referenced until it ends."""
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _opened(self, client: paho.Client, _userdata: Any, sock: paho.SocketLike) -> None:
        self.loop.add_reader(sock, client.loop_read)

    def _closed(self, _client: paho.Client, _userdata: Any, sock: paho.SocketLike) -> None:
        self.loop.remove_reader(sock)
        self.loop.remove_writer(sock)

    def _want_write(self, client: paho.Client, _userdata: Any, sock: paho.SocketLike) -> None:
        self.loop.add_writer(sock, client.loop_write)

    def _written(self, _client: paho.Client, _userdata: Any, sock: paho.SocketLike) -> None:
        self.loop.remove_writer(sock)

    async def keepalive(self, period_s: float = 1.0, share: int = 5) -> None:
        """Call ``loop_misc`` on every client once per ``share`` periods, spread out."""
        turn = 0
        while True:
            await asyncio.sleep(period_s)
            for i, client in enumerate(list(self.clients)):
                if i % share == turn:
                    client.loop_misc()
            turn = (turn + 1) % share


@dataclass(frozen=True)
class BrokerAddress:
    """Where the broker is and how to log in to it."""

    host: str
    port: int
    tls: ssl.SSLContext | None = None
    username: str | None = None
    password: str | None = None
    keepalive_s: int = 60

    @classmethod
    def parse(cls, url: str, tls: ssl.SSLContext | None = None, **kw: Any) -> BrokerAddress:
        """From ``mqtt://host:port`` / ``mqtts://host:port``."""
        u = urlsplit(url)
        secure = u.scheme in ("mqtts", "ssl")
        port = u.port or (8883 if secure else 1883)
        return cls(u.hostname or "localhost", port, tls if secure else None, **kw)


def tls_context(
    ca_file: str | None, cert_file: str | None = None, key_file: str | None = None
) -> ssl.SSLContext:
    """A client TLS context trusting ``ca_file`` (or the system), with a client certificate.

    Raises:
        OSError, ssl.SSLError: a file cannot be read or does not hold what it should.
    """
    ctx = ssl.create_default_context(cafile=ca_file)
    if cert_file is not None:
        ctx.load_cert_chain(cert_file, key_file)
    return ctx


class Connection:
    """One MQTT 5 connection, kept up until :meth:`close` (or paused by :meth:`drop`)."""

    def __init__(
        self,
        client_id: str,
        broker: BrokerAddress,
        bridge: LoopBridge,
        gate: RateGate,
        *,
        on_up: Callable[[Connection], None],
        on_down: Callable[[Connection, bool], None],
        on_message: Callable[[str, bytes], None],
    ) -> None:
        """``on_up`` runs once connected (subscribe there); ``on_down(conn, expected)``
        when the connection ends; ``on_message(topic, payload)`` for each message."""
        self.client_id = client_id
        self.broker = broker
        self._bridge = bridge
        self._gate = gate
        self._on_up, self._on_down, self._on_msg = on_up, on_down, on_message
        self.up = False
        self._wanted = False  # keep (re)connecting while set
        self._expected_down = False
        self._backoff = 1.0
        self._will: tuple[str, Callable[[], bytes]] | None = None
        self.client = self._make_client()

    def _make_client(self) -> paho.Client:
        client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=paho.MQTTv5
        )
        b = self.broker
        if b.username is not None:
            client.username_pw_set(b.username, b.password)
        if b.tls is not None:
            client.tls_set_context(b.tls)
        client.max_queued_messages_set(0)
        client.max_inflight_messages_set(100)
        client.on_connect = self._connected
        client.on_disconnect = self._disconnected
        client.on_message = self._message
        self._bridge.attach(client)
        return client

    def set_will(self, topic: str, payload: Callable[[], bytes]) -> None:
        """The Last Will (retained, QoS 1); ``payload()`` is called at every connect."""
        self._will = (topic, payload)

    async def open(self) -> None:
        """Connect, retrying with backoff until it works or :meth:`close` is called."""
        self._wanted = True
        while self._wanted and not self.up:
            await self._gate.wait()
            if not self._wanted:
                return
            try:
                self._connect()
                return  # the CONNACK arrives through the loop
            except (OSError, ssl.SSLError) as exc:
                log.debug("%s: cannot connect: %s", self.client_id, exc)
                await asyncio.sleep(self._next_backoff())

    def _connect(self) -> None:
        if self._will is not None:
            topic, payload = self._will
            self.client.will_set(topic, payload(), qos=1, retain=True)
        b = self.broker
        self.client.connect(b.host, b.port, keepalive=b.keepalive_s, clean_start=True)

    def _next_backoff(self) -> float:
        delay = self._backoff
        self._backoff = min(_BACKOFF_MAX_S, self._backoff * 2)
        return delay

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> bool:
        """Queue a message; ``False`` when the connection is down (nothing is queued)."""
        return self.publish_tracked(topic, payload, qos=qos, retain=retain) is not None

    def publish_tracked(
        self, topic: str, payload: bytes, *, qos: int, retain: bool = False
    ) -> paho.MQTTMessageInfo | None:
        """Queue a message; its paho handle (``is_published()`` once the broker has it at
        QoS 1), or None when the connection is down."""
        if not self.up:
            return None
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        return info if info.rc == paho.MQTT_ERR_SUCCESS else None

    def subscribe(self, topics: list[str]) -> None:
        """Subscribe to ``topics`` at QoS 1 (call from ``on_up``)."""
        for start in range(0, len(topics), 500):
            chunk = topics[start : start + 500]
            self.client.subscribe([(t, SubscribeOptions(qos=1)) for t in chunk])

    def unsubscribe(self, topics: list[str]) -> None:
        if self.up and topics:
            self.client.unsubscribe(topics)

    def drop(self) -> None:
        """End the connection as a lost device would: the broker publishes the Will."""
        self._wanted = False
        self._expected_down = True
        if self.up:
            will = ReasonCode(PacketTypes.DISCONNECT, identifier=_WITH_WILL)
            self.client.disconnect(reasoncode=will)

    def close(self) -> None:
        """A clean disconnect (no Will): the caller published the offline status first."""
        self._wanted = False
        self._expected_down = True
        self.client.disconnect()  # also stops a connect in progress
        self._bridge.detach(self.client)

    # --- paho callbacks (on the loop) -----------------------------------------------

    def _connected(
        self, _c: paho.Client, _u: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        if reason.is_failure:
            log.warning("%s: the broker refused the connection: %s", self.client_id, reason)
            self._retry()
            return
        self.up, self._backoff, self._expected_down = True, 1.0, False
        self._on_up(self)

    def _disconnected(
        self, _c: paho.Client, _u: Any, _flags: Any, reason: ReasonCode, _props: Any
    ) -> None:
        was_up, self.up = self.up, False
        expected = self._expected_down
        if was_up:
            self._on_down(self, expected)
        if not expected:
            log.debug("%s: connection lost (%s)", self.client_id, reason)
            self._retry()

    def _retry(self) -> None:
        if not self._wanted:
            return
        delay = self._next_backoff()
        self._bridge.loop.call_later(delay, lambda: self._bridge.spawn(self._reopen()))

    async def _reopen(self) -> None:
        if self._wanted and not self.up:
            await self.open()

    def _message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        self._on_msg(msg.topic, bytes(msg.payload))
