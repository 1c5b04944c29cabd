"""What the devices report, as the fleet sees it on the broker: the retained ``status`` and
the ``update`` events (PROTOCOL.md), recorded with their arrival time."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion


@dataclass(frozen=True)
class UpdateEvent:
    """One ``edge/{device}/update`` message."""

    device: str
    doc: dict[str, Any]
    #: ``time.perf_counter()`` when it arrived.
    at: float

    @property
    def state(self) -> str:
        return str(self.doc.get("state"))

    @property
    def to_version(self) -> str | None:
        return self.doc.get("to_version")

    @property
    def reason_code(self) -> str | None:
        reason = self.doc.get("reason")
        return reason.get("code") if isinstance(reason, dict) else None


class Watcher:
    """A paho client subscribed to every device's status and update events."""

    def __init__(self, port: int, tls: dict[str, str], client_id: str = "e2e-watcher") -> None:
        self._lock = threading.Lock()
        self._status: dict[str, dict[str, Any]] = {}
        self._events: list[UpdateEvent] = []
        subscribed = threading.Event()
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        c.tls_set(ca_certs=tls["ca_certs"], certfile=tls["certfile"], keyfile=tls["keyfile"])
        c.on_message = self._on_message
        c.on_subscribe = lambda *_: subscribed.set()
        c.on_connect = lambda cl, *_: cl.subscribe([("edge/+/status", 1), ("edge/+/update", 1)])
        c.connect("127.0.0.1", port, keepalive=30)
        c.loop_start()
        self._client = c
        if not subscribed.wait(10):
            self.close()
            raise RuntimeError(f"the watcher could not subscribe on port {port}")

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if len(parts) != 3 or not msg.payload:
            return
        doc = json.loads(msg.payload)
        with self._lock:
            if parts[2] == "status":
                self._status[parts[1]] = doc
            else:
                self._events.append(UpdateEvent(parts[1], doc, time.perf_counter()))

    def status(self, device: str) -> dict[str, Any] | None:
        """The device's latest status document."""
        with self._lock:
            return self._status.get(device)

    def serving(self, device: str, model: str) -> str | None:
        """The version of ``model`` the device's status says it serves (when ready)."""
        doc = (self.status(device) or {}).get("models", {}).get(model) or {}
        return doc.get("version") if doc.get("state") == "ready" else None

    def events(self, device: str | None = None, since: float = 0.0) -> list[UpdateEvent]:
        """Update events (of ``device``) that arrived after ``since`` (perf_counter)."""
        with self._lock:
            return [
                e for e in self._events if (device is None or e.device == device) and e.at >= since
            ]

    def wait_event(
        self,
        device: str,
        predicate: Callable[[UpdateEvent], bool],
        timeout: float,
        since: float = 0.0,
    ) -> UpdateEvent:
        """The first event of ``device`` since ``since`` for which ``predicate`` holds."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events(device, since):
                if predicate(event):
                    return event
            if time.monotonic() > deadline:
                seen = [(e.state, e.to_version) for e in self.events(device, since)]
                raise AssertionError(f"{device}: no such update event in {timeout:g} s: {seen}")
            time.sleep(0.05)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
