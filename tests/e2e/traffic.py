"""Inference traffic to real agents, as an application would send it (PROTOCOL.md): MQTT 5
requests with a Response Topic of the client's own (``edge/{device}/infer/{model}/reply/
{identity}``, the only reply topic the ACL lets it read) and a Correlation Data per request.

:meth:`Traffic.ask` sends one request and waits; :meth:`Traffic.load` sends requests at a
fixed rate from a thread (open loop: the next one goes out whatever came back) and, when
stopped, reports every request with its outcome, latency and the version that answered.
"""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def tensor_request(values: list[float], name: str = "x") -> bytes:
    """A JSON request with one FP32 input of shape ``[1, len(values)]``."""
    inputs = [{"name": name, "shape": [1, len(values)], "datatype": "FP32", "data": values}]
    return json.dumps({"inputs": inputs}).encode()


@dataclass(frozen=True)
class Outcome:
    """One request of a load run."""

    device: str
    #: ``time.perf_counter()`` just before it was published.
    sent_at: float
    #: Seconds to the reply; None when no reply came.
    latency_s: float | None
    #: ``ok``, an error code, or ``unanswered``.
    result: str
    #: The ``model_version`` that answered (None for errors).
    version: str | None


class Traffic:
    """One paho client sending requests as the identity ``identity`` (see the module doc)."""

    _ids = itertools.count()

    def __init__(self, port: int, tls: dict[str, str], identity: str) -> None:
        self.identity = identity
        self._lock = threading.Lock()
        self._waiting: dict[bytes, tuple[str, float]] = {}
        self._done: dict[bytes, tuple[float, dict[str, Any]]] = {}
        self._answered = threading.Condition(self._lock)
        self._seq = itertools.count()
        ready = threading.Event()
        client_id = f"{identity}-e2e-{next(self._ids)}"
        c = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
        c.tls_set(ca_certs=tls["ca_certs"], certfile=tls["certfile"], keyfile=tls["keyfile"])
        c.max_inflight_messages_set(1000)
        c.on_message = self._on_message
        c.on_socket_open = _no_delay
        c.on_subscribe = lambda *_: ready.set()
        c.on_connect = lambda cl, *_: cl.subscribe(f"edge/+/infer/+/reply/{identity}", 1)
        c.connect("127.0.0.1", port, keepalive=30)
        c.loop_start()
        self._client = c
        if not ready.wait(10):
            self.close()
            raise RuntimeError(f"the inference client could not subscribe on port {port}")

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        cid = getattr(msg.properties, "CorrelationData", None)
        with self._answered:
            if cid in self._waiting:
                self._done[cid] = (now, json.loads(msg.payload))
                self._answered.notify_all()

    def send(
        self, device: str, model: str, payload: bytes, content_type: str | None = None
    ) -> bytes:
        """Publish one request (QoS 1, not waiting for the PUBACK); its correlation data."""
        cid = f"{self.identity}/{next(self._seq)}".encode()
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = f"edge/{device}/infer/{model}/reply/{self.identity}"
        props.CorrelationData = cid
        if content_type is not None:
            props.ContentType = content_type
        with self._lock:
            self._waiting[cid] = (device, time.perf_counter())
        self._client.publish(f"edge/{device}/infer/{model}", payload, 1, properties=props)
        return cid

    def result(self, cid: bytes, timeout: float) -> tuple[float, dict[str, Any]] | None:
        """(seconds to the reply, the reply) of request ``cid``; None after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._answered:
            while cid not in self._done:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._answered.wait(left)
            at, doc = self._done.pop(cid)
            _, sent = self._waiting.pop(cid)
        return at - sent, doc

    def ask(
        self,
        device: str,
        model: str,
        payload: bytes,
        content_type: str | None = None,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Send one request and return the reply (AssertionError without one)."""
        got = self.result(self.send(device, model, payload, content_type), timeout)
        assert got is not None, f"{device}/{model}: no reply within {timeout:g} s"
        return got[1]

    def load(
        self,
        devices: list[str],
        model: str,
        payload: bytes,
        per_s: float,
        content_type: str | None = None,
    ) -> Load:
        """Start sending requests at ``per_s`` in all, to ``devices`` in turn."""
        return Load(self, devices, model, payload, per_s, content_type)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()


class Load:
    """Requests at a fixed rate from a thread until :meth:`stop` (see :meth:`Traffic.load`)."""

    def __init__(  # noqa: PLR0917 (Traffic.load's arguments, passed on)
        self,
        traffic: Traffic,
        devices: list[str],
        model: str,
        payload: bytes,
        per_s: float,
        content_type: str | None,
    ) -> None:
        self.traffic = traffic
        self._sent: list[tuple[bytes, str, float]] = []
        self._stop = threading.Event()
        args = (devices, model, payload, per_s, content_type)
        self._thread = threading.Thread(target=self._run, args=args, daemon=True)
        self._thread.start()

    def _run(
        self, devices: list[str], model: str, payload: bytes, per_s: float, ctype: str | None
    ) -> None:
        start = time.perf_counter()
        for n in itertools.count():
            due = start + n / per_s
            if self._stop.wait(max(0.0, due - time.perf_counter())):
                return
            device = devices[n % len(devices)]
            at = time.perf_counter()
            self._sent.append((self.traffic.send(device, model, payload, ctype), device, at))

    def stop(self, drain_s: float = 5.0) -> list[Outcome]:
        """Stop sending; every request sent, with its outcome (waiting up to ``drain_s``
        for the last replies)."""
        self._stop.set()
        self._thread.join()
        deadline = time.monotonic() + drain_s
        outcomes = []
        for cid, device, at in self._sent:
            got = self.traffic.result(cid, max(0.0, deadline - time.monotonic()))
            if got is None:
                outcomes.append(Outcome(device, at, None, "unanswered", None))
                continue
            latency, doc = got
            error = doc.get("error")
            result = str(error.get("code")) if isinstance(error, dict) else "ok"
            version = doc.get("model_version") if error is None else None
            outcomes.append(Outcome(device, at, latency, result, version))
        return outcomes


def _no_delay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
