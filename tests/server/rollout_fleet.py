"""A simulated fleet for the rollout tests: real releases and enrolled devices in the
database, and device messages (status, telemetry, update events) fed through the real
ingest path (``IngestService.submit`` on the device's topic, then a flush), exactly as
the MQTT client hands them over. No agent runs; the server loop is whole."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select

from agent.protocol import status_topic, telemetry_topic, update_topic
from agent.protocol.documents import format_timestamp
from fleet_server.config import IngestSettings
from fleet_server.domain import ArtifactKind
from fleet_server.ingest import IngestService
from fleet_server.rollouts import operations
from fleet_server.rollouts.domain import RolloutSpec, RolloutView
from fleet_server.rollouts.engine import EngineSettings, RolloutEngine, TickReport
from fleet_server.store import assignments, audit, releases
from fleet_server.store import devices as inventory
from fleet_server.store.engine import Database
from fleet_server.store.models import DesiredModelRow
from fleet_server.store.rollout_models import RolloutDeviceRow, RolloutRow

PI5, ORIN = "raspberry-pi-5", "jetson-orin"
STALE = timedelta(seconds=30)


class Clock:
    """A clock the test moves forward (the engine, the ingest and the devices share it)."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


@dataclass
class RecordingHints:
    """A hint publisher (the seam) that records what it was asked to send."""

    sent: list[tuple[str, int]] = field(default_factory=list)
    up: bool = True

    def publish_hint(self, device_id: str, revision: int) -> bool:
        if self.up:
            self.sent.append((device_id, revision))
        return self.up

    def last(self) -> dict[str, int]:
        return dict(self.sent)


class Fleet:
    """Releases, devices and their messages, over one database."""

    def __init__(self, db: Database, clock: Clock | None = None) -> None:
        self.db = db
        self.clock = clock or Clock()
        settings = IngestSettings(device_rate_per_s=10_000, device_burst=10_000)
        self.ingest = IngestService(db, settings)
        self.hints = RecordingHints()

    # --- set-up -----------------------------------------------------------------------

    def release(
        self,
        version: str,
        *,
        model: str = "face",
        profiles: tuple[str, ...] = (PI5, ORIN),
        variant: str = "default",
    ) -> None:
        with self.db.write() as s:
            releases.add_variant(
                s,
                name=model,
                version=version,
                variant=variant,
                kind=ArtifactKind.BUNDLE,
                format="onnx",
                sha256=hashlib.sha256(f"{model}/{version}/{variant}".encode()).hexdigest(),
                size=1000,
                filename=f"{model}.tgz",
                manifest={"compatible_profiles": list(profiles)},
                actor="test",
            )

    def device(
        self,
        device_id: str,
        *,
        tags: dict[str, str] | None = None,
        profile: str = PI5,
        running: str | None = "1.2.0",
        online: bool = True,
    ) -> None:
        with self.db.write() as s:
            inventory.enrol_device(
                s,
                device_id=device_id,
                facts={"profile": profile},
                tags=tags or {"site": "berlin"},
                cert_serial=None,
                actor="test",
                stale_after=STALE,
            )
        if online:
            self.status(device_id, running=running, profile=profile)

    def devices(self, n: int, prefix: str = "cam", **kw: Any) -> list[str]:
        ids = [f"{prefix}-{i:02d}" for i in range(n)]
        for i in ids:
            self.device(i, **kw)
        self.flush()
        return ids

    # --- device messages, through the ingest ---------------------------------------

    def _submit(self, topic: str, doc: dict[str, Any]) -> None:
        assert self.ingest.submit(topic, json.dumps(doc).encode(), received_at=self.clock())

    def status(
        self,
        device: str,
        *,
        running: str | None = "1.2.0",
        profile: str = PI5,
        state: str = "online",
    ) -> None:
        ts = format_timestamp(self.clock())
        doc: dict[str, Any] = {"state": state, "ts": ts}
        if state != "offline":
            doc |= {"agent_version": "0.3.0", "profile": profile, "started_at": ts, "models": {}}
            if running is not None:
                doc["models"]["face"] = {
                    "version": running,
                    "state": "ready",
                    "format": "onnx",
                    "provider": "CPU",
                }
        self._submit(status_topic(device), doc)

    def event(
        self,
        device: str,
        rollout: int | None,
        state: str,
        *,
        to: str = "1.3.0",
        frm: str | None = "1.2.0",
        code: str = "golden_mismatch",
    ) -> None:
        doc: dict[str, Any] = {
            "ts": format_timestamp(self.clock()),
            "rollout_id": str(rollout) if rollout is not None else None,
            "model": "face",
            "from_version": frm,
            "to_version": to,
            "state": state,
        }
        if state in ("failed", "rolled_back"):
            doc["reason"] = {"code": code, "message": f"{code} on {device}"}
        self._submit(update_topic(device), doc)

    def update(
        self,
        device: str,
        rollout: int,
        *,
        outcome: str = "committed",
        to: str = "1.3.0",
        code: str = "golden_mismatch",
    ) -> None:
        """A whole update as an agent reports it, ending in ``outcome``."""
        steps = ["downloading", "verifying", "validating", "activating"]
        if outcome in ("committed", "rolled_back", "probation"):
            steps.append("probation")
        for step in steps:
            self.event(device, rollout, step, to=to)
        if outcome != "probation":
            self.event(device, rollout, outcome, to=to, code=code)

    def telemetry(self, device: str, seq: int, p95: float, *, at: datetime) -> None:
        doc = {
            "ts": format_timestamp(at),
            "seq": seq,
            "system": {
                "cpu_percent": 1.0,
                "mem_used_bytes": 1,
                "mem_total_bytes": 2,
                "agent_rss_bytes": 1,
                "disk_free_bytes": 1,
            },
            "models": {
                "face": {
                    "requests": seq * 10,
                    "errors": {},
                    "queue_depth": 0,
                    "provider": "CPU",
                    "latency_ms": {"p50": p95 / 2, "p95": p95, "p99": p95 * 1.5},
                }
            },
        }
        self._submit(telemetry_topic(device), doc)

    def flush(self) -> None:
        self.ingest.flush()

    # --- the server side --------------------------------------------------------------

    def engine(self, *, batch_size: int = 500, db: Database | None = None) -> RolloutEngine:
        return RolloutEngine(
            db or self.db,
            settings=EngineSettings(batch_size=batch_size),
            publisher=self.hints,
            clock=self.clock,
        )

    def create(self, **spec: Any) -> RolloutView:
        spec.setdefault("model", "face")
        spec.setdefault("version", "1.3.0")
        spec.setdefault("target", {"tags": {"site": "berlin"}})
        with self.db.write() as s:
            return operations.create(
                s,
                RolloutSpec.model_validate(spec),
                actor="token:ops",
                now=self.clock(),
                stale_after=STALE,
            )

    def tick(self, engine: RolloutEngine) -> TickReport:
        self.flush()
        return engine.tick()

    # --- reading back --------------------------------------------------------------------

    def states(self, rollout: int) -> dict[str, str]:
        with self.db.read() as s:
            rows = s.scalars(select(RolloutDeviceRow).where(RolloutDeviceRow.rollout_id == rollout))
            return {r.device_id: r.state for r in rows}

    def row_of_rollout(self, rollout: int) -> RolloutRow:
        with self.db.read() as s:
            row = s.get(RolloutRow, rollout)
            assert row is not None
            return row

    def row(self, rollout: int, device: str) -> RolloutDeviceRow:
        with self.db.read() as s:
            row = s.get(RolloutDeviceRow, (rollout, device))
            assert row is not None
            return row

    def desired(self) -> dict[str, tuple[str, int | None, int]]:
        """device -> (version, rollout_id, row revision) of its desired ``face``."""
        with self.db.read() as s:
            rows = s.scalars(select(DesiredModelRow).where(DesiredModelRow.model == "face"))
            return {r.device_id: (r.version, r.rollout_id, r.revision) for r in rows}

    def revision(self, device: str) -> int:
        with self.db.read() as s:
            return assignments.device_revision(s, device)

    def audit(self, action: str, rollout: int | None = None) -> list[dict[str, Any] | None]:
        with self.db.read() as s:
            page = audit.list_entries(
                s, limit=1000, target_id=str(rollout) if rollout is not None else None
            )
        return [e.after for e in reversed(page.items) if e.action == action]
