"""Inference requests from MQTT: decode, route the reply, queue or refuse at once.

This runs on the transport's network thread, so it only does cheap work: decode the
payload (``np.frombuffer`` views, no copies of binary tensors), find where the reply
goes, compute the deadline, and hand a :class:`~agent.serving.Job` to the model's
slot. Every refusal (``bad_request``, ``payload_too_large``, ``unknown_model``,
``model_not_ready``, ``overloaded``) is answered from here, at once, whenever a reply
topic is known.

Reply routing (``docs/protocol.md``): the MQTT 5 Response Topic and Correlation Data;
else the body's ``reply_to`` and ``id``; else ``{prefix}/{device}/infer/{model}/reply``.
An oversized body is not parsed, so it is answered on the Response Topic or the
default topic. A reply topic that is one of the device's own topics (status, telemetry,
update, cmd, an infer topic) is refused with ``bad_request`` on the default topic, so
that a client cannot make the device publish something that poses as its status or
events. A request to a model name outside the protocol's alphabet is answered
``unknown_model`` where the client asked (it has no default reply topic).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from agent.errors import BadRequest, EdgeError, PayloadTooLarge, UnknownModel
from agent.protocol import (
    MalformedRequest,
    decode_request,
    default_reply_topic,
    encode_exception,
    is_control_topic,
    is_valid_id,
    reply_topic_for,
    request_deadline,
)
from agent.serving import JSON, Job, ModelSlot
from agent.transport import Message, Transport

log = logging.getLogger("agent.intake")

#: At most one "replies are being dropped" warning per this many seconds.
DROP_LOG_INTERVAL_S = 10.0

#: Records a refusal for a model's telemetry: (model name, error code).
RecordRefusal = Callable[[str, str], None]


class Intake:
    """Subscribes to ``{prefix}/{device}/infer/+`` and feeds the model slots."""

    def __init__(
        self,
        *,
        device_id: str,
        prefix: str,
        transport: Transport,
        slots: Mapping[str, ModelSlot],
        max_payload_bytes: int,
        record_refusal: RecordRefusal = lambda _m, _c: None,
        record_unrouted: Callable[[str], None] = lambda _c: None,
        record_dropped: Callable[[], None] = lambda: None,
    ) -> None:
        self.device_id = device_id
        self.prefix = prefix
        self.transport = transport
        self.slots = slots
        self.max_payload_bytes = max_payload_bytes
        self.record_refusal = record_refusal
        self.record_unrouted = record_unrouted
        self.record_dropped = record_dropped
        self._last_drop_log = 0.0
        self._base = f"{prefix}/{device_id}/infer/"

    @property
    def topic_filter(self) -> str:
        return self._base + "+"

    def subscribe(self) -> None:
        self.transport.subscribe(self.topic_filter, 1, self.on_message)

    # --- the network thread ------------------------------------------------------------

    def on_message(self, msg: Message) -> None:
        """Handle one request message. Never raises."""
        try:
            self._handle(msg)
        except Exception:  # the daemon never crashes on input
            log.exception("request on %s: unexpected error", msg.topic)

    def _handle(self, msg: Message) -> None:
        model = msg.topic[len(self._base) :]
        default = (
            default_reply_topic(self.device_id, model, self.prefix) if is_valid_id(model) else None
        )
        qos = min(msg.qos, 1)
        try:
            request = decode_request(
                msg.payload, content_type=msg.content_type, max_bytes=self.max_payload_bytes
            )
        except MalformedRequest as exc:
            topic, _ = self._route(msg, exc.reply_to, default)
            self._refuse(model, topic, exc.request_id, exc, msg)
            return
        except PayloadTooLarge as exc:
            topic, _ = self._route(msg, None, default)
            self._refuse(model, topic, None, exc, msg)
            return
        topic, refusal = self._route(msg, request.reply_to, default)
        if refusal is not None:
            self._refuse(model, topic, request.id, refusal, msg)
            return
        slot = self.slots.get(model)
        if slot is None:
            known = ", ".join(sorted(self.slots)) or "none"
            err = UnknownModel(
                f"no model {model[:80]!r} on device {self.device_id!r} (serving: {known})"
            )
            self._refuse(model, topic, request.id, err, msg)
            return
        expiry = msg.message_expiry_interval
        job = Job(
            request=request,
            reply_topic=topic,
            received_at=msg.received_at,
            deadline=request_deadline(
                msg.received_at,
                deadline_ms=request.parameters.deadline_ms,
                expiry_interval_s=float(expiry) if expiry is not None else None,
            ),
            correlation_data=msg.correlation_data,
            qos=qos,
        )
        try:
            if not slot.try_inline(job):
                slot.submit(job)
        except EdgeError as exc:
            self._refuse(model, topic, request.id, exc, msg)

    def _route(
        self, msg: Message, reply_to: str | None, default: str | None
    ) -> tuple[str | None, BadRequest | None]:
        """Where the reply goes (None: nowhere), and the refusal of a reply topic that
        is one of the device's own topics (then answered on the default topic)."""
        topic = reply_topic_for(msg.response_topic, reply_to, default or "") or None
        if topic is not None and is_control_topic(topic, self.device_id, self.prefix):
            refusal = BadRequest(f"reply topic {topic[:80]!r} is one of the device's own topics")
            return default, refusal
        return topic, None

    def _refuse(
        self, model: str, topic: str | None, request_id: str | None, exc: EdgeError, msg: Message
    ) -> None:
        if model in self.slots:
            self.record_refusal(model, exc.code)
        else:  # client-chosen names must not grow the stats registry
            self.record_unrouted(exc.code)
        if topic is None:
            log.debug("request on %r refused (%s) with nowhere to answer", msg.topic[:200], exc)
            return
        self._publish(
            topic, encode_exception(request_id, exc), JSON, msg.correlation_data, min(msg.qos, 1)
        )

    # --- replies (worker threads and the network thread) --------------------------------

    def send(self, job: Job, payload: bytes, content_type: str) -> None:
        """Publish a worker's reply for ``job``. Never raises."""
        if job.reply_topic is not None:
            self._publish(job.reply_topic, payload, content_type, job.correlation_data, job.qos)

    def _publish(
        self,
        topic: str,
        payload: bytes,
        content_type: str,
        correlation_data: bytes | None,
        qos: int,
    ) -> None:
        try:
            sent = self.transport.publish(
                topic,
                payload,
                qos=qos,
                content_type=content_type,
                correlation_data=correlation_data,
            )
        except ValueError as exc:  # an invalid reply topic given by the client
            log.warning("reply to %r not sent: %s", topic[:200], exc)
            return
        if not sent:  # the outgoing queue is full, or QoS 0 while disconnected
            self.record_dropped()
            now = time.monotonic()
            if now - self._last_drop_log > DROP_LOG_INTERVAL_S:
                self._last_drop_log = now
                log.warning(
                    "replies are being dropped: the MQTT outgoing queue is full or the broker "
                    "is unreachable (counted as replies_dropped in telemetry)"
                )
