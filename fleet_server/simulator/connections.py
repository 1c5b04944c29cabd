"""How the virtual devices reach the broker: one connection each, or a few shared ones.

:class:`DeviceLinks` gives every device its own MQTT connection, client id = device id,
with its offline status as the Last Will: the broker can authorise each device (with
``--register enrol`` over ``mqtts://``, by the certificate the server signed), and a
simulated outage ends the connection so that the broker publishes the Will.

:class:`SharedLinks` multiplexes the devices over ``connections`` connections. It is a
**load-only** mode: the broker sees one identity publishing on every device's topics, so
it cannot authorise per device (that identity needs ``edge/+/...`` rights), a connection
carries no per-device Will (an outage is announced by the simulator publishing the
offline status itself), and a lost connection leaves its devices ``stale``, not
``offline``.
"""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
from collections.abc import Callable
from functools import partial
from typing import Protocol

import paho.mqtt.client as paho

from agent.protocol import desired_topic, status_topic
from fleet_server.simulator.device import VirtualDevice
from fleet_server.simulator.link import BrokerAddress, Connection, LoopBridge, RateGate
from fleet_server.simulator.settings import SimulatorSettings

_CLOSE_WAIT_S = 5.0


class FleetEvents(Protocol):
    """What the links tell the fleet."""

    def came_online(self, device: VirtualDevice) -> None:
        """The device's connection is up and subscribed: it publishes its status."""

    def went_offline(self, device: VirtualDevice, expected: bool) -> None:
        """The device is off the broker (``expected``: an outage or the shutdown)."""

    def message(self, device: VirtualDevice, topic: str, payload: bytes) -> None:
        """A message for the device (its ``desired`` hint)."""


class Links(Protocol):
    """The devices' way to the broker."""

    def start(self, devices: list[VirtualDevice]) -> None:
        """Connect every device (in the background, at the connect rate)."""

    def publish(
        self, device: VirtualDevice, topic: str, payload: bytes, qos: int, retain: bool = False
    ) -> bool:
        """Send for ``device``; ``False`` when its connection is down."""

    def drop(self, device: VirtualDevice) -> None:
        """A simulated outage: the device goes offline until :meth:`back`."""

    def back(self, device: VirtualDevice) -> None:
        """The outage ends: the device reconnects."""

    async def close(self, devices: list[VirtualDevice]) -> None:
        """A clean shutdown: each online device publishes its offline status, then every
        connection is closed."""


async def _until(done: Callable[[], bool], timeout_s: float = _CLOSE_WAIT_S) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not done() and loop.time() < deadline:
        await asyncio.sleep(0.05)


async def _goodbye(
    goodbyes: list[paho.MQTTMessageInfo | None], connections: list[Connection]
) -> None:
    """Wait for the broker to acknowledge the offline statuses, then close the
    connections: closed earlier, the socket's unread acknowledgements make the kernel
    reset the connection, and the broker drops what it had not read yet."""
    sent = [g for g in goodbyes if g is not None]
    await _until(lambda: all(g.is_published() for g in sent))
    for conn in connections:
        conn.close()
    await _until(lambda: not any(c.up for c in connections))


class DeviceLinks:
    """One MQTT connection per device, each with its Last Will."""

    def __init__(
        self,
        settings: SimulatorSettings,
        bridge: LoopBridge,
        events: FleetEvents,
        tls_for: Callable[[VirtualDevice], ssl.SSLContext | None],
    ) -> None:
        self._settings = settings
        self._bridge = bridge
        self._gate = RateGate(settings.connect_rate)
        self._events = events
        self._tls_for = tls_for
        self._conns: dict[str, Connection] = {}

    def start(self, devices: list[VirtualDevice]) -> None:
        s, ev = self._settings, self._events
        for d in devices:
            broker = BrokerAddress.parse(s.mqtt_url, self._tls_for(d), keepalive_s=s.keepalive_s)
            conn = Connection(
                d.id,
                broker,
                self._bridge,
                self._gate,
                on_up=partial(self._up, d),
                on_down=partial(self._down, d),
                on_message=partial(ev.message, d),
            )
            conn.set_will(status_topic(d.id, s.topic_prefix), VirtualDevice.offline_status)
            self._conns[d.id] = conn
            self._bridge.spawn(conn.open())

    def _up(self, device: VirtualDevice, conn: Connection) -> None:
        conn.subscribe([desired_topic(device.id, self._settings.topic_prefix)])
        self._events.came_online(device)

    def _down(self, device: VirtualDevice, _conn: Connection, expected: bool) -> None:
        self._events.went_offline(device, expected)

    def publish(
        self, device: VirtualDevice, topic: str, payload: bytes, qos: int, retain: bool = False
    ) -> bool:
        return self._conns[device.id].publish(topic, payload, qos=qos, retain=retain)

    def drop(self, device: VirtualDevice) -> None:
        self._conns[device.id].drop()

    def back(self, device: VirtualDevice) -> None:
        self._bridge.spawn(self._conns[device.id].open())

    async def close(self, devices: list[VirtualDevice]) -> None:
        prefix = self._settings.topic_prefix
        goodbyes = [
            conn.publish_tracked(status_topic(d.id, prefix), d.offline_status(), qos=1, retain=True)
            for d in devices
            if (conn := self._conns.get(d.id)) is not None
        ]
        await _goodbye(goodbyes, list(self._conns.values()))


class SharedLinks:
    """The devices multiplexed over a few connections: load only (see the module doc)."""

    def __init__(
        self,
        settings: SimulatorSettings,
        bridge: LoopBridge,
        events: FleetEvents,
        tls: ssl.SSLContext | None,
    ) -> None:
        self._settings = settings
        self._bridge = bridge
        self._gate = RateGate(settings.connect_rate)
        self._events = events
        self._tls = tls
        self._conns: list[Connection] = []
        self._members: list[list[VirtualDevice]] = []
        self._index: dict[str, int] = {}
        self._by_topic: dict[str, VirtualDevice] = {}

    def _desired(self, device: VirtualDevice) -> str:
        return desired_topic(device.id, self._settings.topic_prefix)

    def start(self, devices: list[VirtualDevice]) -> None:
        s = self._settings
        n = min(s.connections, len(devices))
        broker = BrokerAddress.parse(
            s.mqtt_url,
            self._tls,
            username=s.mqtt_username,
            password=s.mqtt_password,
            keepalive_s=s.keepalive_s,
        )
        self._members = [[] for _ in range(n)]
        for i, d in enumerate(devices):
            self._members[i % n].append(d)
            self._index[d.id] = i % n
            self._by_topic[self._desired(d)] = d
        tag = f"{socket.gethostname()[:20]}-{os.getpid()}"
        for k in range(n):
            conn = Connection(
                f"sim-{s.id_prefix}-{tag}-{k}",
                broker,
                self._bridge,
                self._gate,
                on_up=partial(self._up, k),
                on_down=partial(self._down, k),
                on_message=self._message,
            )
            self._conns.append(conn)
            self._bridge.spawn(conn.open())

    def _up(self, k: int, conn: Connection) -> None:
        present = [d for d in self._members[k] if not d.away]
        conn.subscribe([self._desired(d) for d in present])
        for d in present:
            self._events.came_online(d)

    def _down(self, k: int, _conn: Connection, expected: bool) -> None:
        for d in self._members[k]:
            if d.online:
                self._events.went_offline(d, expected)

    def _message(self, topic: str, payload: bytes) -> None:
        device = self._by_topic.get(topic)
        if device is not None:
            self._events.message(device, topic, payload)

    def publish(
        self, device: VirtualDevice, topic: str, payload: bytes, qos: int, retain: bool = False
    ) -> bool:
        return self._conns[self._index[device.id]].publish(topic, payload, qos=qos, retain=retain)

    def drop(self, device: VirtualDevice) -> None:
        conn = self._conns[self._index[device.id]]
        topic = status_topic(device.id, self._settings.topic_prefix)
        conn.publish(topic, device.offline_status(), qos=1, retain=True)
        conn.unsubscribe([self._desired(device)])
        if device.online:
            self._events.went_offline(device, True)

    def back(self, device: VirtualDevice) -> None:
        conn = self._conns[self._index[device.id]]
        if conn.up:  # else the device comes back with its connection
            conn.subscribe([self._desired(device)])
            self._events.came_online(device)

    async def close(self, devices: list[VirtualDevice]) -> None:
        prefix = self._settings.topic_prefix
        goodbyes = [
            self._conns[self._index[d.id]].publish_tracked(
                status_topic(d.id, prefix), d.offline_status(), qos=1, retain=True
            )
            for d in devices
            if d.online
        ]
        await _goodbye(goodbyes, self._conns)
