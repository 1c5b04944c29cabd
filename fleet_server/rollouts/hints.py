"""The ``desired`` hint: ``{"revision": N}``, retained, QoS 1, on ``{prefix}/{device}/desired``.

It is sent from an outbox: every assignment change bumps the device's revision in the
database (:mod:`fleet_server.store.assignments`) in the same transaction, and
:func:`publish_pending` later sends each revision that was not sent yet, then records it.
So a hint is never lost to a crash between the commit and the publish, an operator's pin
made through the API is hinted like a rollout's change, and while the broker is away the
hints wait. The hint is only a wake-up: the agent trusts the signed director metadata,
never this message, so a duplicate or a late hint is harmless.
"""

from __future__ import annotations

import logging
from typing import Protocol

from agent.errors import BadRequest
from agent.protocol import DesiredHint, desired_topic
from fleet_server.store import assignments
from fleet_server.store.engine import Database

log = logging.getLogger("fleet_server.rollouts.hints")


class MqttPublisher(Protocol):
    """What sends an MQTT message (the ingest's client: ``MqttIngest.publish``)."""

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool) -> bool:
        """Hand the message to the client; ``False`` when it cannot be sent now."""
        ...


class HintPublisher(Protocol):
    """Sends one device's ``desired`` hint."""

    def publish_hint(self, device_id: str, revision: int) -> bool:
        """``True`` once the hint is handed to the broker connection."""
        ...


class MqttHintPublisher:
    """Publishes hints as retained QoS 1 messages through an MQTT client."""

    def __init__(self, client: MqttPublisher, topic_prefix: str = "edge") -> None:
        self.client = client
        self.prefix = topic_prefix

    def publish_hint(self, device_id: str, revision: int) -> bool:
        """Publish ``{"revision": revision}`` retained on the device's desired topic;
        ``False`` when the client is not connected. Never raises."""
        try:
            topic = desired_topic(device_id, self.prefix)
        except BadRequest:
            log.warning("not hinting %r: not a valid topic part", device_id)
            return True  # nothing will ever make it sendable; do not retry it forever
        payload = DesiredHint(revision=revision).to_json()
        return self.client.publish(topic, payload, qos=1, retain=True)


def publish_pending(db: Database, publisher: HintPublisher, *, limit: int = 1000) -> int:
    """Publish up to ``limit`` revisions not yet hinted; returns how many were sent.

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    with db.write() as session:
        pending = assignments.pending_hints(session, limit)
        sent = [(device, rev) for device, rev in pending if publisher.publish_hint(device, rev)]
        assignments.mark_published(session, sent)
    return len(sent)
