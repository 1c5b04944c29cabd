"""Conversions between paho's messages and properties and the transport's own types."""

from __future__ import annotations

from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.transport.base import Message


@dataclass(frozen=True, slots=True)
class Outgoing:
    """A message to publish, held until it can be handed to paho."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    content_type: str | None = None
    correlation_data: bytes | None = None
    response_topic: str | None = None
    message_expiry_interval: int | None = None


def publish_properties(out: Outgoing) -> Properties | None:
    """The MQTT 5 PUBLISH properties of ``out``; None when it sets none of them."""
    if (
        out.content_type is None
        and out.correlation_data is None
        and out.response_topic is None
        and out.message_expiry_interval is None
    ):
        return None
    props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
    if out.content_type is not None:
        props.ContentType = out.content_type
    if out.correlation_data is not None:
        props.CorrelationData = out.correlation_data
    if out.response_topic is not None:
        props.ResponseTopic = out.response_topic
    if out.message_expiry_interval is not None:
        props.MessageExpiryInterval = out.message_expiry_interval
    return props


def from_paho(msg: paho.MQTTMessage) -> Message | None:
    """The :class:`Message` for a message paho received; None if its topic is not UTF-8.

    paho sets a property attribute only when the packet carried it, so a missing one
    reads as None (and a 3.1.1 message has none).
    """
    try:
        topic = msg.topic
    except UnicodeDecodeError:
        return None
    props = msg.properties
    expiry = getattr(props, "MessageExpiryInterval", None)
    return Message(
        topic=topic,
        payload=bytes(msg.payload),
        qos=msg.qos,
        retain=bool(msg.retain),
        content_type=getattr(props, "ContentType", None),
        correlation_data=getattr(props, "CorrelationData", None),
        response_topic=getattr(props, "ResponseTopic", None),
        message_expiry_interval=int(expiry) if expiry is not None else None,
    )
