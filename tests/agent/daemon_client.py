"""An inference client for the daemon tests: plain paho, MQTT 5 or 3.1.1, replies sorted by topic.

Written against ``PROTOCOL.md`` only (independent of the agent's transport): MQTT 5 requests
carry a Response Topic and Correlation Data; 3.1.1 requests carry ``reply_to`` and ``id`` in
a JSON or ETNS body, or get their answer on the default reply topic.
"""

from __future__ import annotations

import itertools
import json
import queue
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.protocol import ErrorReply, InferResponse, decode_response


@dataclass(frozen=True)
class Reply:
    """One message the client received."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    correlation_data: bytes | None
    content_type: str | None
    #: ``time.perf_counter()`` when paho handed it over.
    at: float

    def decoded(self) -> InferResponse | ErrorReply:
        return decode_response(self.payload)

    def response(self) -> InferResponse:
        """The successful response (AssertionError on an error reply)."""
        reply = self.decoded()
        assert isinstance(reply, InferResponse), f"expected a response, got {reply}"
        return reply

    def error(self) -> ErrorReply:
        """The error reply (AssertionError on a response)."""
        reply = self.decoded()
        assert isinstance(reply, ErrorReply), f"expected an error, got {self.payload[:300]!r}"
        return reply

    def json(self) -> Any:
        return json.loads(self.payload)


class MqttClient:
    """A connected paho client that publishes requests and files every message by topic."""

    _ids = itertools.count()

    def __init__(
        self,
        port: int,
        *,
        v5: bool = True,
        client_id: str | None = None,
        username: str | None = None,
        password: str | None = None,
        tls: dict[str, Any] | None = None,
    ) -> None:
        self.v5 = v5
        self.client_id = client_id or f"test-{next(self._ids)}-{time.monotonic_ns() % 10**9}"
        self._client = paho.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
        )
        self._lock = threading.Lock()
        self._topics: dict[str, queue.Queue[Reply]] = {}
        self._subacks: dict[int, list[Any]] = {}
        self._pubacks: dict[int, Any] = {}
        self._seq = itertools.count()
        self._subscribed: set[str] = set()
        connected = threading.Event()
        c = self._client
        c.on_connect = lambda _c, _u, _f, rc, _p: None if rc.is_failure else connected.set()
        c.on_message = self._on_message
        c.on_subscribe = lambda _c, _u, mid, rcs, _p: self._subacks.__setitem__(mid, rcs)
        c.on_publish = lambda _c, _u, mid, rc, _p: self._pubacks.__setitem__(mid, rc)
        c.on_socket_open = _no_delay  # else Nagle holds a request behind the last PUBACK
        if username is not None:
            c.username_pw_set(username, password)
        if tls is not None:
            c.tls_set(**tls)
        c.connect("127.0.0.1", port, keepalive=30)
        c.loop_start()
        if not connected.wait(10):
            c.loop_stop()
            raise RuntimeError(f"the test client could not connect to port {port}")
        self.subscribe(f"replies/{self.client_id}/#")

    # --- plumbing -----------------------------------------------------------------------

    def _on_message(self, _c: paho.Client, _u: Any, msg: paho.MQTTMessage) -> None:
        props = msg.properties
        reply = Reply(
            topic=msg.topic,
            payload=bytes(msg.payload),
            qos=msg.qos,
            retain=bool(msg.retain),
            correlation_data=getattr(props, "CorrelationData", None),
            content_type=getattr(props, "ContentType", None),
            at=time.perf_counter(),
        )
        self._queue(msg.topic).put(reply)

    def _queue(self, topic: str) -> queue.Queue[Reply]:
        with self._lock:
            q = self._topics.get(topic)
            if q is None:
                q = self._topics[topic] = queue.Queue()
            return q

    def subscribe(self, topic_filter: str, qos: int = 1, timeout: float = 5.0) -> list[Any]:
        """Subscribe and wait for the SUBACK; its reason codes."""
        _, mid = self._client.subscribe(topic_filter, qos)
        deadline = time.monotonic() + timeout
        while mid not in self._subacks:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no SUBACK for {topic_filter}")
            time.sleep(0.002)
        return self._subacks.pop(mid)

    def publish(
        self,
        topic: str,
        payload: bytes,
        *,
        qos: int = 1,
        retain: bool = False,
        content_type: str | None = None,
        response_topic: str | None = None,
        correlation_data: bytes | None = None,
        expiry_s: int | None = None,
    ) -> Any:
        """Publish and wait until sent (QoS 0) or acknowledged: the PUBACK reason (MQTT 5)."""
        props = None
        if self.v5 and any(
            v is not None for v in (content_type, response_topic, correlation_data, expiry_s)
        ):
            props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
            if content_type is not None:
                props.ContentType = content_type
            if response_topic is not None:
                props.ResponseTopic = response_topic
            if correlation_data is not None:
                props.CorrelationData = correlation_data
            if expiry_s is not None:
                props.MessageExpiryInterval = expiry_s
        info = self._client.publish(topic, payload, qos, retain, props)
        info.wait_for_publish(5)
        return self._pubacks.pop(info.mid, None)

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()

    # --- replies ---------------------------------------------------------------------------

    def new_reply_topic(self) -> str:
        """A reply topic of this client's own, never used before."""
        return f"replies/{self.client_id}/{next(self._seq)}"

    def expect(self, topic: str, timeout: float = 5.0) -> Reply:
        """The next message on ``topic``; AssertionError after ``timeout``."""
        try:
            return self._queue(topic).get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no message on {topic} within {timeout} s") from None

    def expect_where(
        self, topic: str, predicate: Callable[[Reply], bool], timeout: float = 10.0
    ) -> Reply:
        """The first message on ``topic`` for which ``predicate`` holds (others are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no matching message on {topic} within {timeout} s")
            try:
                reply = self._queue(topic).get(timeout=left)
            except queue.Empty:
                continue
            if predicate(reply):
                return reply

    def nothing_on(self, topic: str, within: float) -> bool:
        """True when no message arrives on ``topic`` within ``within`` seconds."""
        try:
            reply = self._queue(topic).get(timeout=within)
        except queue.Empty:
            return True
        self._queue(topic).put(reply)
        return False

    def drain(self, topic: str) -> list[Reply]:
        """Every message on ``topic`` received so far."""
        q, got = self._queue(topic), []
        while True:
            try:
                got.append(q.get_nowait())
            except queue.Empty:
                return got

    def send(
        self,
        model: str,
        payload: bytes,
        *,
        device: str = "cam-01",
        reply_topic: str | None = None,
        correlation_data: bytes | None = None,
        **publish: Any,
    ) -> tuple[str, float]:
        """Publish a request; (the topic its reply comes on, ``perf_counter`` before publishing).

        MQTT 5: the Response Topic is ``reply_topic`` (a fresh one by default) and the
        Correlation Data ``correlation_data`` (fresh too). MQTT 3.1.1: ``reply_topic`` is
        what the body's ``reply_to`` says, or None for the default reply topic.
        """
        if self.v5:
            reply_topic = reply_topic or self.new_reply_topic()
            publish["response_topic"] = reply_topic
            publish["correlation_data"] = correlation_data or reply_topic.encode()
        topic = f"edge/{device}/infer/{model}"
        wait_on = reply_topic or f"{topic}/reply"
        if reply_topic is None:
            self.subscribe_default(device, model)
        t0 = time.perf_counter()
        self.publish(topic, payload, **publish)
        return wait_on, t0

    def request(self, model: str, payload: bytes, *, timeout: float = 5.0, **send: Any) -> Reply:
        """:meth:`send` and wait for the reply; checks the echoed Correlation Data (MQTT 5)."""
        topic, _ = self.send(model, payload, **send)
        reply = self.expect(topic, timeout)
        if self.v5 and topic.startswith("replies/"):
            assert reply.correlation_data == send.get("correlation_data", topic.encode())
        return reply

    def subscribe_default(self, device: str, model: str) -> None:
        """Listen on ``edge/{device}/infer/{model}/reply`` (once)."""
        topic = f"edge/{device}/infer/{model}/reply"
        with self._lock:
            if topic in self._subscribed:
                return
            self._subscribed.add(topic)
        self.subscribe(topic)


def _no_delay(_client: paho.Client, _userdata: Any, sock: Any) -> None:
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
