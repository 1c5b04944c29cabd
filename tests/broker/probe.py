"""A plain paho client for tests, independent of the agent's transport."""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


@dataclass
class Probe:
    """A plain paho client (independent of the agent's transport) that records what it gets."""

    client: paho.Client
    received: queue.Queue[paho.MQTTMessage] = field(default_factory=queue.Queue)
    subacks: dict[int, list[Any]] = field(default_factory=dict)

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 5.0) -> list[Any]:
        """Subscribe and wait for the SUBACK; returns its reason codes."""
        _, mid = self.client.subscribe(topic_filter, qos)
        deadline = time.monotonic() + timeout
        while mid not in self.subacks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SUBACK for {topic_filter}")
            time.sleep(0.005)
        return self.subacks[mid]

    def publish(self, topic: str, payload: bytes, qos: int = 1, **kw: Any) -> None:
        """Publish and wait until it is sent (QoS 0) or acknowledged (QoS 1/2)."""
        self.client.publish(topic, payload, qos, **kw).wait_for_publish(5)

    def expect(self, timeout: float = 5.0) -> paho.MQTTMessage:
        """The next message received; queue.Empty after ``timeout``."""
        return self.received.get(timeout=timeout)

    def nothing(self, within: float) -> bool:
        """True when no message arrives within ``within`` seconds."""
        try:
            msg = self.received.get(timeout=within)
        except queue.Empty:
            return True
        self.received.put(msg)
        return False

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@contextlib.contextmanager
def probe(port: int, **options: Any) -> Iterator[Probe]:
    """A connected :class:`Probe` on 127.0.0.1:``port``.

    ``options``: ``protocol`` (paho.MQTTv5 default), ``username``, ``password``,
    ``tls`` (a dict for ``tls_set``: ca_certs, certfile, keyfile), ``client_id``.
    """
    client = paho.Client(
        CallbackAPIVersion.VERSION2,
        client_id=options.get("client_id", f"probe-{time.monotonic_ns()}"),
        protocol=options.get("protocol", paho.MQTTv5),
    )
    p = Probe(client)
    connected = threading.Event()
    client.on_connect = lambda c, u, f, rc, props: connected.set() if not rc.is_failure else None
    client.on_message = lambda c, u, m: p.received.put(m)
    client.on_subscribe = lambda c, u, mid, rcs, props: p.subacks.__setitem__(mid, rcs)
    if "username" in options:
        client.username_pw_set(options["username"], options.get("password"))
    if "tls" in options:
        client.tls_set(**options["tls"])
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    if not connected.wait(5):
        client.loop_stop()
        raise RuntimeError(f"probe could not connect to port {port}")
    try:
        yield p
    finally:
        p.close()
