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
default topic.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from agent.errors import EdgeError, PayloadTooLarge, UnknownModel
from agent.protocol import (
    MalformedRequest,
    decode_request,
    default_reply_topic,
    encode_exception,
    reply_topic_for,
    request_deadline,
)
from agent.serving import JSON, Job, ModelSlot
from agent.transport import Message, Transport

log = logging.getLogger("agent.intake")

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
    ) -> None:
        self.device_id = device_id
        self.prefix = prefix
        self.transport = transport
        self.slots = slots
        self.max_payload_bytes = max_payload_bytes
        self.record_refusal = record_refusal
        self.record_unrouted = record_unrouted
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
        default = default_reply_topic(self.device_id, model, self.prefix)
        qos = min(msg.qos, 1)
        try:
            request = decode_request(
                msg.payload, content_type=msg.content_type, max_bytes=self.max_payload_bytes
            )
        except MalformedRequest as exc:
            topic = reply_topic_for(msg.response_topic, exc.reply_to, default)
            self._refuse(model, topic, exc.request_id, exc, msg)
            return
        except PayloadTooLarge as exc:
            self._refuse(model, msg.response_topic or default, None, exc, msg)
            return
        topic = reply_topic_for(msg.response_topic, request.reply_to, default)
        slot = self.slots.get(model)
        if slot is None:
            known = ", ".join(sorted(self.slots)) or "none"
            err = UnknownModel(
                f"no model {model!r} on device {self.device_id!r} (serving: {known})"
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
            slot.submit(job)
        except EdgeError as exc:
            self._refuse(model, topic, request.id, exc, msg)

    def _refuse(
        self, model: str, topic: str, request_id: str | None, exc: EdgeError, msg: Message
    ) -> None:
        if model in self.slots:
            self.record_refusal(model, exc.code)
        else:  # client-chosen names must not grow the stats registry
            self.record_unrouted(exc.code)
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
            self.transport.publish(
                topic,
                payload,
                qos=qos,
                content_type=content_type,
                correlation_data=correlation_data,
            )
        except ValueError as exc:  # an invalid reply topic given by the client
            log.warning("reply to %r not sent: %s", topic[:200], exc)
