"""Building one telemetry document from the system gauges and the models' stats.

The daemon's telemetry tick::

    seq = outbox.next_seq()
    payload = collector.collect(seq, {name: ModelGauge(provider, queue_depth), ...},
                                outbox_dropped=outbox.dropped_total)
    outbox.put(telemetry_topic, payload, qos)
    if transport.is_connected:
        outbox.flush(publish)

(:meth:`TelemetryCollector.enqueue` does the first three lines.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from agent.protocol.documents import ModelTelemetry, TelemetryDocument, utc_now
from agent.protocol.tensors import dumps

if TYPE_CHECKING:
    from agent.telemetry.outbox import Outbox
    from agent.telemetry.stats import AgentStats
    from agent.telemetry.system import SystemCollector, SystemReading


@dataclass(frozen=True, slots=True)
class ModelGauge:
    """What the serving side knows about a model served now."""

    #: The execution provider or delegate that actually serves it.
    provider: str
    #: Requests waiting in its queue at this instant.
    queue_depth: int


class TelemetryCollector:
    """Makes the telemetry documents of device ``device_id``.

    Each :meth:`collect` closes a latency interval: the percentiles it reports cover
    the requests answered since the previous call.
    """

    def __init__(
        self,
        device_id: str,
        system: SystemCollector,
        stats: AgentStats,
        *,
        clock: Callable[[], datetime] = utc_now,
    ) -> None:
        self.device_id = device_id
        self._system = system
        self._stats = stats
        self._clock = clock

    def document(self, seq: int, models: Mapping[str, ModelGauge]) -> TelemetryDocument:
        """The protocol's telemetry document for the models served now.

        Models served no more keep their counters (a later hot swap back continues
        them), but their interval is closed too, so a returning model starts afresh.

        Raises:
            ValueError: ``seq`` or a queue depth is negative, or a model name is not
                ``[A-Za-z0-9_.-]{1,64}`` (a pydantic ``ValidationError``).
        """
        return self._build(seq, models)[0]

    def _build(
        self, seq: int, models: Mapping[str, ModelGauge]
    ) -> tuple[TelemetryDocument, SystemReading]:
        ts = self._clock()
        reading = self._system.read()
        entries: dict[str, ModelTelemetry] = {}
        for name, stats in self._stats.all().items():
            latency = stats.take_interval()
            gauge = models.get(name)
            if gauge is None:
                continue
            snap = stats.snapshot()
            entries[name] = ModelTelemetry(
                requests=snap.requests_total,
                errors=dict(snap.errors_total),
                latency_ms=latency,
                queue_depth=gauge.queue_depth,
                provider=gauge.provider,
            )
        for name, gauge in models.items():
            if name not in entries:  # served, but no stats yet: nothing answered so far
                entries[name] = ModelTelemetry(
                    requests=0,
                    errors={},
                    latency_ms=None,
                    queue_depth=gauge.queue_depth,
                    provider=gauge.provider,
                )
        document = TelemetryDocument(ts=ts, seq=seq, system=reading.to_document(), models=entries)
        return document, reading

    def collect(
        self,
        seq: int,
        models: Mapping[str, ModelGauge],
        *,
        outbox_dropped: int | None = None,
    ) -> bytes:
        """The telemetry message as JSON bytes: the document plus informative extras.

        Extras (the protocol allows unknown fields): ``system.temperatures_c``,
        ``system.loads_percent`` and ``system.flags`` when the profile's sensors gave
        any, ``unrouted_errors`` (requests that reached no model, by code) when there
        were some, and ``outbox_dropped`` when given.

        Raises:
            ValueError: as :meth:`document`.
        """
        document, reading = self._build(seq, models)
        body: dict[str, Any] = document.model_dump(mode="json")
        body["system"].update(reading.extra_fields())
        unrouted = self._stats.unrouted_errors
        if unrouted:
            body["unrouted_errors"] = unrouted
        dropped = self._stats.replies_dropped
        if dropped:
            body["replies_dropped"] = dropped
        if outbox_dropped is not None:
            body["outbox_dropped"] = outbox_dropped
        return dumps(body)

    def enqueue(
        self,
        outbox: Outbox,
        topic: str,
        models: Mapping[str, ModelGauge],
        *,
        qos: int = 0,
    ) -> int:
        """Collect a document with the outbox's next ``seq`` and append it; return the seq.

        Raises:
            ValueError: as :meth:`document`, or an invalid ``qos``.
            OutboxError: the outbox cannot be written.
        """
        seq = outbox.next_seq("telemetry")
        payload = self.collect(seq, models, outbox_dropped=outbox.dropped_total)
        outbox.put(topic, payload, qos=qos)
        return seq
