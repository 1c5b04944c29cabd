"""One virtual device: what it runs, its counters, and the protocol documents it sends.

Documents are exactly the device protocol's (``agent.protocol.documents``): the status
(retained, and its Last Will) and update events are built with the protocol's own models;
telemetry, sent by every device every interval, is built as a dict and encoded with
orjson (``tests/server/test_simulator.py`` checks it against ``TelemetryDocument``).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from agent.errors import EdgeError
from agent.protocol.documents import (
    ErrorInfo,
    ModelStatus,
    StatusDocument,
    UpdateEvent,
    UpdateState,
    format_timestamp,
    utc_now,
)
from agent.protocol.tensors import dumps_fast
from fleet_server.simulator.settings import ModelSpec, SimulatorSettings
from fleet_server.simulator.traits import Traits

AGENT_VERSION = "0.1.0"
#: Telemetry kept while the broker is unreachable (the agent's outbox is bounded too).
BACKLOG = 200
_ERROR_CODES = ("overloaded", "deadline_exceeded", "bad_input")


@dataclass
class RunningModel:
    """A model a device serves."""

    name: str
    version: str
    format: str
    provider: str
    #: The artifact's sha256 once the device installed it from the fleet (None: the
    #: model it was set up with, known by its version only).
    sha256: str | None
    latency_ms: float
    requests: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class VirtualDevice:
    """The state of one simulated device and the documents it publishes."""

    def __init__(
        self,
        device_id: str,
        traits: Traits,
        models: tuple[ModelSpec, ...],
        settings: SimulatorSettings,
        rng: random.Random,
    ) -> None:
        self.id = device_id
        self.traits = traits
        self.settings = settings
        self.rng = rng
        self.started_at = utc_now()
        self.models: dict[str, RunningModel] = {
            m.name: RunningModel(
                m.name,
                m.version,
                m.format,
                traits.provider(m.format),
                None,
                traits.latency_ms(m.format, m.name),
            )
            for m in models
        }
        self.initial_versions = {m.name: m.version for m in models}
        self.seq = 0
        self.mem_fraction = rng.uniform(0.3, 0.6)
        self.disk_free = float(traits.disk_free_bytes)
        #: (topic, payload, qos) produced while offline (telemetry, update events), sent
        #: in order on return; bounded like the agent's outbox.
        self.backlog: deque[tuple[str, bytes, int]] = deque(maxlen=BACKLOG)
        #: Artifacts (sha256) this device refused or failed: not tried again.
        self.refused: set[str] = set()
        self.online = False
        #: In a simulated outage (not a lost connection): stays offline until it ends.
        self.away = False
        #: Connected at least once.
        self.started = False
        #: When the poll timer next wakes the updater (event-loop time).
        self.next_poll = 0.0

    # --- status -------------------------------------------------------------------------

    def status(self) -> bytes:
        """The retained ``online`` status, with every model and its provider."""
        doc = StatusDocument(
            state="online",
            ts=utc_now(),
            agent_version=AGENT_VERSION,
            profile=self.traits.profile,
            started_at=self.started_at,
            models={
                m.name: ModelStatus(
                    version=m.version, state="ready", format=m.format, provider=m.provider
                )
                for m in self.models.values()
            },
        )
        return doc.to_json()

    @staticmethod
    def offline_status() -> bytes:
        """The Last Will (also the last word of a clean shutdown)."""
        return StatusDocument(state="offline", ts=utc_now()).to_json()

    # --- telemetry ----------------------------------------------------------------------

    def telemetry(self, now: datetime, interval_s: float) -> bytes:
        """This interval's telemetry document: counters since start, this interval's
        latency percentiles (``null`` when no request came), plausible system gauges."""
        s, rng, t = self.settings, self.rng, self.traits
        models: dict[str, Any] = {}
        busy = 0.0
        for m in self.models.values():
            n = int(s.request_rate * interval_s * rng.uniform(0.5, 1.5) + rng.random())
            m.requests += n
            failed = int(n * s.error_rate + rng.random())  # the mean, randomly rounded
            if failed:
                code = rng.choice(_ERROR_CODES)
                m.errors[code] = m.errors.get(code, 0) + failed
            latency = None
            if n:
                p50 = m.latency_ms * rng.lognormvariate(0.0, 0.08)
                p95 = p50 * rng.uniform(1.4, 1.8)
                latency = {
                    "p50": round(p50, 3),
                    "p95": round(p95, 3),
                    "p99": round(p95 * rng.uniform(1.1, 1.4), 3),
                }
                busy += n * p50 / 1000
            models[m.name] = {
                "requests": m.requests,
                "errors": dict(m.errors),
                "latency_ms": latency,
                "queue_depth": rng.choice((0, 0, 0, 0, 0, 0, 0, 1, 1, 2)) if n else 0,
                "provider": m.provider,
            }
        cpu = t.cpu_base + 100.0 * busy / max(interval_s, 0.1) + rng.uniform(-2.0, 2.0)
        cpu = min(100.0, max(0.5, cpu))
        self.mem_fraction = min(0.9, max(0.2, self.mem_fraction + rng.uniform(-0.01, 0.01)))
        self.disk_free = max(0.0, self.disk_free - rng.uniform(0, 4096) * interval_s)
        system: dict[str, Any] = {
            "cpu_percent": round(cpu, 1),
            "mem_used_bytes": int(t.mem_total_bytes * self.mem_fraction),
            "mem_total_bytes": t.mem_total_bytes,
            "agent_rss_bytes": t.agent_rss_bytes + rng.randrange(0, 4 * 1024**2),
            "disk_free_bytes": int(self.disk_free),
        }
        if t.has_temperature:
            system["temperature_c"] = round(38.0 + 0.35 * cpu + rng.uniform(-1.5, 1.5), 1)
        self.seq += 1
        doc = {"ts": format_timestamp(now), "seq": self.seq, "system": system, "models": models}
        return dumps_fast(doc)

    # --- updates ------------------------------------------------------------------------

    def serves(self, model: str, version: str, sha256: str) -> bool:
        """True when ``model`` already runs this artifact (by digest, or by version for
        the model the device was set up with)."""
        m = self.models.get(model)
        if m is None:
            return False
        if m.sha256 is not None:
            return m.sha256 == sha256
        return m.version == version

    def install(self, model: str, version: str, sha256: str | None) -> None:
        """Swap ``model`` to ``version`` (its latency follows ``latency_regression`` when it
        is not the version the device started with)."""
        m = self.models[model]
        base = self.traits.latency_ms(m.format, model)
        if version != self.initial_versions.get(model):
            base *= 1.0 + self.settings.latency_regression
        m.version, m.sha256, m.latency_ms = version, sha256, base

    @staticmethod
    def update_event(
        model: str,
        state: UpdateState,
        *,
        rollout_id: str | None,
        from_version: str | None,
        to_version: str,
        reason: EdgeError | None = None,
    ) -> bytes:
        """One ``update`` event; ``reason`` exactly on ``failed`` and ``rolled_back``."""
        return UpdateEvent(
            ts=utc_now(),
            rollout_id=rollout_id,
            model=model,
            from_version=from_version,
            to_version=to_version,
            state=state,
            reason=ErrorInfo(**reason.to_dict()) if reason is not None else None,
        ).to_json()
