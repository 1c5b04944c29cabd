"""Telemetry, status and update-event ingest: from MQTT messages to batched DB writes.

The flow, in two threads:

1. ``submit`` (called on the MQTT network thread; cheap, never blocks): the device id and
   the kind are taken from the topic (never from the payload), a per-device token bucket
   drops floods, and the raw message joins a bounded queue (full: dropped and counted).
2. The writer thread wakes every ``flush_interval_ms``, parses what is queued with the
   protocol's document models (malformed: dropped and counted per device) and writes it
   all in ONE transaction with executemany inserts (``store.device_reports``).

When the database is down, the writer keeps its batch and retries with backoff; the
queue absorbs the gap and then drops new messages (counted). QoS 1 messages (status,
update events) are acknowledged to the broker only after their batch is committed, so
an acknowledged message is never lost. A batch that fails for any other reason is
retried report by report, so one bad message cannot stall the others.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from agent.errors import BadRequest
from agent.protocol import (
    StatusDocument,
    TelemetryDocument,
    TopicKind,
    UpdateEvent,
    decode_document,
    parse_topic,
)
from fleet_server.config import IngestSettings
from fleet_server.domain import ReportedModel, utcnow
from fleet_server.errors import StoreUnavailable
from fleet_server.store.device_reports import (
    ModelSample,
    Report,
    StatusReport,
    TelemetryReport,
    UpdateReport,
    apply_batch,
)
from fleet_server.store.engine import Database

log = logging.getLogger("fleet_server.ingest")

KINDS = {TopicKind.STATUS, TopicKind.TELEMETRY, TopicKind.UPDATE}
#: Device clocks run fast sometimes: telemetry more than this far in the future is stamped
#: with the time it was received instead.
MAX_CLOCK_SKEW = timedelta(minutes=5)
_MAX_TRACKED_DEVICES = 100_000
_FIELD_MAX = 64


#: How long an update event or a status may wait for room in a full ingest queue.
IMPORTANT_WAIT_S = 5.0


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; one message costs one token."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, float(burst)
        self.tokens, self.stamp = float(burst), now

    def take(self, now: float) -> bool:
        """Spend one token; ``False`` when the bucket is empty."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


@dataclass
class IngestStats:
    """Counters since start (per replica). ``per_device`` holds the rejects of each device."""

    received: int = 0
    queued: int = 0
    written: int = 0
    batches: int = 0
    rate_limited: int = 0
    malformed: int = 0
    ignored_topic: int = 0
    queue_full: int = 0
    too_large: int = 0
    dropped_unknown: int = 0
    dropped_revoked: int = 0
    write_errors: int = 0
    db_retries: int = 0
    per_device: dict[str, dict[str, int]] = field(default_factory=dict)

    def snapshot(self) -> dict[str, object]:
        """The counters as a JSON-ready dict (the 20 worst devices only)."""
        worst = sorted(self.per_device.items(), key=lambda kv: -sum(kv[1].values()))[:20]
        data: dict[str, object] = {
            k: v for k, v in self.__dict__.items() if k != "per_device" and isinstance(v, int)
        }
        data["worst_devices"] = dict(worst)
        return data


@dataclass(frozen=True, slots=True)
class _Raw:
    device: str
    kind: TopicKind
    payload: bytes
    retained: bool
    received_at: datetime
    ack: Callable[[], None] | None


def _short(value: str | None, what: str) -> str | None:
    if value is not None and len(value) > _FIELD_MAX:
        raise BadRequest(f"{what} longer than {_FIELD_MAX} characters")
    return value


def to_report(raw: _Raw) -> Report:
    """Parse one message into a report for the store.

    Raises:
        BadRequest: the payload is not a valid document of its topic's kind.
    """
    if raw.kind is TopicKind.STATUS:
        s = decode_document(StatusDocument, raw.payload)
        models = None
        if s.models is not None:
            models = tuple(
                ReportedModel(
                    name,
                    str(_short(m.version, "model version")),
                    m.state,
                    _short(m.format, "model format"),
                    _short(m.provider, "provider"),
                )
                for name, m in sorted(s.models.items())
            )
        return StatusReport(
            device_id=raw.device,
            received_at=raw.received_at,
            ts=s.ts,
            state=s.state,
            retained=raw.retained,
            agent_version=_short(s.agent_version, "agent_version"),
            profile=s.profile[:128] if s.profile else None,
            models=models,
            doc=s.model_dump(mode="json"),
        )
    if raw.kind is TopicKind.TELEMETRY:
        t = decode_document(TelemetryDocument, raw.payload)
        ts = t.ts if t.ts <= raw.received_at + MAX_CLOCK_SKEW else raw.received_at
        samples = tuple(
            ModelSample(
                name=name,
                requests=m.requests,
                errors=sum(m.errors.values()),
                p50_ms=m.latency_ms.p50 if m.latency_ms else None,
                p95_ms=m.latency_ms.p95 if m.latency_ms else None,
                p99_ms=m.latency_ms.p99 if m.latency_ms else None,
                queue_depth=float(m.queue_depth),
            )
            for name, m in t.models.items()
        )
        system = t.system.model_dump()
        return TelemetryReport(
            device_id=raw.device,
            received_at=raw.received_at,
            ts=int(ts.timestamp()),
            seq=t.seq,
            system={k: (float(v) if v is not None else None) for k, v in system.items()},
            models=samples,
        )
    u = decode_document(UpdateEvent, raw.payload)
    return UpdateReport(
        device_id=raw.device,
        received_at=raw.received_at,
        ts=u.ts,
        model=u.model,
        state=u.state,
        rollout_id=_short(u.rollout_id, "rollout_id"),
        from_version=_short(u.from_version, "from_version"),
        to_version=_short(u.to_version, "to_version"),
        reason=u.reason.model_dump() if u.reason else None,
    )


class IngestService:
    """The queue, the flood control and the batching writer. Transport-independent."""

    def __init__(self, db: Database, settings: IngestSettings, *, topic_prefix: str = "edge"):
        self.db = db
        self.settings = settings
        self.prefix = topic_prefix
        self.stats = IngestStats()
        self._queue: queue.Queue[_Raw] = queue.Queue(maxsize=settings.queue_max)
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    # --- the network-thread side ----------------------------------------------------

    def _count(self, device: str | None, what: str) -> None:
        with self._lock:
            setattr(self.stats, what, getattr(self.stats, what) + 1)
            if device is None:
                return
            per = self.stats.per_device.get(device)
            if per is None:
                if len(self.stats.per_device) >= _MAX_TRACKED_DEVICES:
                    return
                per = self.stats.per_device[device] = {}
            per[what] = per.get(what, 0) + 1

    def submit(
        self,
        topic: str,
        payload: bytes,
        *,
        retained: bool = False,
        ack: Callable[[], None] | None = None,
        received_at: datetime | None = None,
    ) -> bool:
        """Accept one MQTT message for writing; ``False`` when it was dropped (and counted).

        ``ack`` is called once the message is durably stored, or at once when it is
        dropped: it acknowledges a QoS 1 message to the broker. Never raises.
        """
        self.stats.received += 1
        ok = self._admit(topic, payload, retained, ack, received_at)
        if not ok and ack is not None:
            ack()
        return ok

    def _admit(
        self,
        topic: str,
        payload: bytes,
        retained: bool,
        ack: Callable[[], None] | None,
        received_at: datetime | None,
    ) -> bool:
        try:
            device, kind, _ = parse_topic(topic, self.prefix)
        except BadRequest:
            self._count(None, "ignored_topic")
            return False
        if kind not in KINDS or (kind is TopicKind.STATUS and not payload):
            self._count(None, "ignored_topic")  # an empty retained status clears it
            return False
        now = time.monotonic()
        bucket = self._buckets.get(device)
        if bucket is None:
            s = self.settings
            bucket = self._buckets[device] = TokenBucket(s.device_rate_per_s, s.device_burst, now)
        if not bucket.take(now):
            self._count(device, "rate_limited")
            return False
        if len(payload) > self.settings.max_payload_bytes:
            self._count(device, "too_large")
            return False
        raw = _Raw(device, kind, payload, retained, received_at or utcnow(), ack)
        try:
            if kind is TopicKind.TELEMETRY:  # shed telemetry first under overload
                self._queue.put_nowait(raw)
            else:  # update events and statuses are rare and must not be lost: wait (this
                # holds the MQTT thread, so the broker slows the senders down)
                self._queue.put(raw, timeout=IMPORTANT_WAIT_S)
        except queue.Full:
            self._count(device, "queue_full")
            return False
        self.stats.queued += 1
        return True

    # --- the writer thread ----------------------------------------------------------

    def start(self) -> None:
        """Start the writer thread (idempotent)."""
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="fleet-ingest", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Write what is queued, then stop the writer thread."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def flush(self) -> None:
        """Write everything queued now, in the caller's thread (tests, shutdown)."""
        while self._drain_once():
            pass

    def _run(self) -> None:
        interval = self.settings.flush_interval_ms / 1000
        while not self._stop.is_set():
            self._wake.wait(interval)
            self._wake.clear()
            while self._drain_once() and not self._stop.is_set():
                pass
        self.flush()

    def _drain_once(self) -> bool:
        """Write one batch; ``False`` when the queue was empty."""
        raws: list[_Raw] = []
        try:
            while len(raws) < self.settings.max_batch:
                raws.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        if not raws:
            return False
        reports: list[Report] = []
        for raw in raws:
            try:
                reports.append(to_report(raw))
            except BadRequest as exc:
                self._count(raw.device, "malformed")
                log.debug("malformed %s from %s: %s", raw.kind, raw.device, exc.message)
        if self._write(reports):
            for raw in raws:  # in arrival order, after the commit
                if raw.ack is not None:
                    raw.ack()
        return True

    def _write(self, reports: list[Report]) -> bool:
        """Commit the batch, retrying while the database is unavailable. ``False`` only
        when stopping with the database still down (nothing is acknowledged then)."""
        delay = 0.2
        while True:
            try:
                self._commit(reports)
                return True
            except StoreUnavailable as exc:
                if self._stop.is_set() and delay > 2:
                    log.error("db unavailable at shutdown: %d reports not written", len(reports))
                    self.stats.write_errors += len(reports)
                    return False
                self.stats.db_retries += 1
                log.warning("ingest: %s; retrying in %.1fs", exc.message, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:
                log.exception("ingest: batch of %d failed; writing one by one", len(reports))
                self._write_singly(reports)
                return True

    def _commit(self, reports: list[Report]) -> None:
        with self.db.write() as session:
            result = apply_batch(session, reports, auto_register=self.settings.auto_register)
        with self._lock:
            self.stats.batches += 1
            self.stats.written += len(reports) - result.dropped_unknown - result.dropped_revoked
            self.stats.dropped_unknown += result.dropped_unknown
            self.stats.dropped_revoked += result.dropped_revoked

    def _write_singly(self, reports: list[Report]) -> None:
        for report in reports:
            try:
                self._commit([report])
            except Exception as exc:  # a transient failure here loses only this report
                self._count(report.device_id, "write_errors")
                log.warning("ingest: dropped a report from %s: %s", report.device_id, exc)
