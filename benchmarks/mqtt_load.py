"""The load client of the daemon benchmarks: request/reply over MQTT 5, timed per request.

One paho client on one thread (``client.loop`` driven by hand, TCP_NODELAY on), so no
thread hand-off sits in the measured path. Each request carries a Response Topic (this
client's own) and an 8-byte Correlation Data sequence number; the reply is matched by
it and timed from just before ``publish`` to the moment paho hands it over.

Two ways to load the server:

- closed loop, :meth:`LoadClient.closed`: ``window`` requests in flight; each reply
  sends the next one (``window=1`` measures latency, a large window saturates);
- open loop, :meth:`LoadClient.paced`: requests at a fixed rate whatever comes back
  (overload), then a drain; requests never answered are counted as missing.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

Payload = bytes | bytearray
#: Reply payload -> outcome: ``ok`` or the protocol error code.
Classify = Callable[[Payload], str]
_ids = itertools.count()


def classify_agent(payload: Payload) -> str:
    """``ok``, or the ``error.code`` of an agent's error reply (always JSON)."""
    if payload[:1] == b"{" and b'"error":' in payload[:200]:
        err = json.loads(payload).get("error")
        if isinstance(err, dict):
            return str(err.get("code"))
    return "ok"


def classify_floor(_payload: Payload) -> str:
    return "ok"


def timing_part(payload: Payload) -> bytes:
    """The slice of an agent reply that holds ``timing_ms``: the ETNS header, or the
    tail of a JSON document (the encoder writes ``timing_ms`` last). Cheap to take."""
    if payload[:4] == b"ETNS":
        return bytes(payload[: 8 + int.from_bytes(payload[4:8], "big")])
    return bytes(payload[-160:])


def parse_timing(part: bytes) -> tuple[float, float, float] | None:
    """``(queue, inference, total)`` ms from a :func:`timing_part`; None if absent."""
    if part[:4] == b"ETNS":
        doc = json.loads(part[8:])
        timing = doc.get("timing_ms") if isinstance(doc, dict) else None
    else:
        at = part.rfind(b'"timing_ms":')
        if at < 0:
            return None
        timing = json.loads(part[at + 12 : part.index(b"}", at) + 1])
    if not isinstance(timing, dict):
        return None
    return float(timing["queue"]), float(timing["inference"]), float(timing["total"])


@dataclass(frozen=True)
class Request:
    """What to publish: the same payload for every request of a run."""

    topic: str
    payload: bytes
    content_type: str | None = None


@dataclass
class RunStats:
    """What one run saw. Latencies are in milliseconds, one per reply, in arrival order."""

    sent: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    outcomes: list[str] = field(default_factory=list)
    #: ``time.perf_counter()`` of each reply.
    arrivals: list[float] = field(default_factory=list)
    last_reply: Payload = b""
    #: What the ``keep`` callable of the client took from each reply.
    kept: list[bytes] = field(default_factory=list)

    @property
    def received(self) -> int:
        return len(self.latencies_ms)

    @property
    def missing(self) -> int:
        return self.sent - self.received

    def counts(self) -> Counter[str]:
        return Counter(self.outcomes)

    def latencies(self, outcome: str | None = None) -> np.ndarray[Any, np.dtype[np.float64]]:
        """Latencies of the replies with ``outcome`` (all of them when None)."""
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        if outcome is None:
            return lat
        return np.asarray(lat[np.asarray(self.outcomes) == outcome], dtype=np.float64)

    def rate(self, since: float, until: float, outcome: str = "ok") -> float:
        """Replies with ``outcome`` per second that arrived in ``[since, until)``."""
        t = np.asarray(self.arrivals)
        hit = (t >= since) & (t < until) & (np.asarray(self.outcomes) == outcome)
        return float(hit.sum()) / (until - since)

    def extend(self, other: RunStats) -> None:
        self.sent += other.sent
        self.latencies_ms += other.latencies_ms
        self.outcomes += other.outcomes
        self.arrivals += other.arrivals
        self.kept += other.kept
        self.last_reply = other.last_reply or self.last_reply


class LoadClient:
    """A request/reply client on 127.0.0.1:``port``; not thread-safe (one thread drives it)."""

    def __init__(
        self, port: int, classify: Classify, keep: Callable[[Payload], bytes] | None = None
    ) -> None:
        """``classify`` names each reply's outcome; ``keep`` (if given) takes a small part
        of each reply to look at after the run (see :func:`timing_part`)."""
        name = f"load-{os.getpid()}-{next(_ids)}"
        self.reply_topic = f"bench/{name}/reply"
        self.classify = classify
        self.keep = keep
        self.client = paho.Client(CallbackAPIVersion.VERSION2, name, protocol=paho.MQTTv5)
        self.client.max_inflight_messages_set(65535)
        self.client.max_queued_messages_set(0)
        self.client.on_socket_open = _nodelay
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self._sent_at: dict[int, float] = {}
        self._seq = itertools.count()
        self._stats = RunStats()
        self._request: Request | None = None
        self._qos = 0
        self._next: Callable[[], None] = lambda: None
        self._subscribed = False
        self.client.connect("127.0.0.1", port, keepalive=60)
        self.client.subscribe(self.reply_topic, 1)
        self._pump_until(lambda: self._subscribed, 10.0)

    def close(self) -> None:
        self.client.disconnect()

    # --- runs ----------------------------------------------------------------------------

    def closed(
        self,
        request: Request,
        *,
        qos: int,
        window: int = 1,
        count: int | None = None,
        seconds: float | None = None,
        drain_s: float = 10.0,
    ) -> RunStats:
        """Keep ``window`` requests in flight until ``count`` are sent or ``seconds`` pass,
        then wait up to ``drain_s`` for the rest of the replies."""
        limit = count if count is not None else 1 << 62
        stop_at = time.perf_counter() + seconds if seconds is not None else float("inf")

        def next_one() -> None:
            if self._stats.sent < limit and time.perf_counter() < stop_at:
                self._send()

        self._begin(request, qos, next_one)
        for _ in range(min(window, limit)):
            self._send()
        self._pump_until(
            lambda: self._stats.sent >= limit or time.perf_counter() >= stop_at,
            (seconds or 0) + drain_s + (count or 0) * 1.0,
        )
        return self._finish(drain_s)

    def paced(
        self, request: Request, *, qos: int, rate: float, seconds: float, drain_s: float = 5.0
    ) -> RunStats:
        """Send at ``rate`` requests/s for ``seconds`` whatever comes back, then wait up to
        ``drain_s`` for the replies still due."""
        self._begin(request, qos, lambda: None)
        period = 1.0 / rate
        start = time.perf_counter()
        total = int(rate * seconds)
        due = start
        while self._stats.sent < total:
            now = time.perf_counter()
            while due <= now and self._stats.sent < total:
                self._send()
                due += period
            self.client.loop(timeout=max(0.0, min(due - time.perf_counter(), 0.002)))
        return self._finish(drain_s)

    # --- plumbing --------------------------------------------------------------------------

    def _begin(self, request: Request, qos: int, next_one: Callable[[], None]) -> None:
        self._request, self._qos, self._next = request, qos, next_one
        self._stats = RunStats()
        self._sent_at.clear()

    def _finish(self, drain_s: float) -> RunStats:
        self._pump_until(lambda: not self._sent_at, drain_s)
        self._next = lambda: None
        stats, self._stats = self._stats, RunStats()
        return stats

    def _send(self) -> None:
        request = self._request
        assert request is not None
        seq = next(self._seq)
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.ResponseTopic = self.reply_topic
        props.CorrelationData = seq.to_bytes(8, "big")
        if request.content_type is not None:
            props.ContentType = request.content_type
        self._stats.sent += 1
        self._sent_at[seq] = time.perf_counter()
        self.client.publish(request.topic, request.payload, self._qos, properties=props)

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        now = time.perf_counter()
        corr = getattr(msg.properties, "CorrelationData", None)
        sent = self._sent_at.pop(int.from_bytes(corr, "big"), None) if corr else None
        if sent is None:
            return  # a late reply from an earlier run
        stats = self._stats
        stats.latencies_ms.append((now - sent) * 1000.0)
        stats.outcomes.append(self.classify(msg.payload))
        stats.arrivals.append(now)
        stats.last_reply = msg.payload
        if self.keep is not None:
            stats.kept.append(self.keep(msg.payload))
        self._next()

    def _on_subscribe(self, *_args: Any) -> None:
        self._subscribed = True

    def _pump_until(self, done: Callable[[], bool], timeout: float) -> None:
        deadline = time.perf_counter() + timeout
        while not done() and time.perf_counter() < deadline:
            self.client.loop(timeout=0.01)


def _nodelay(_c: paho.Client, _u: Any, sock: Any) -> None:
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def percentile(values: np.ndarray[Any, Any], q: float) -> float:
    """The ``q``-th percentile, NaN for no values."""
    return float(np.percentile(values, q)) if len(values) else float("nan")
