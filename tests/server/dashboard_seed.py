"""Seeding a fleet for the dashboard tests.

Bulk inventory goes through the ingest's write side (``device_reports.apply_batch`` with
status reports, as the MQTT ingest batches them) plus one bulk insert of tags; telemetry
and update events go through the whole ingest path (``IngestService.submit`` on the
device's topic, then a flush): the documents are parsed exactly as from MQTT.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import insert

from agent.protocol import status_topic, telemetry_topic, update_topic
from agent.protocol.documents import format_timestamp
from fleet_server.config import IngestSettings
from fleet_server.domain import ReportedModel
from fleet_server.ingest import IngestService
from fleet_server.store import devices as inventory
from fleet_server.store.device_reports import StatusReport, apply_batch
from fleet_server.store.engine import Database
from fleet_server.store.models import DeviceTagRow, table_of

PROFILES = ("raspberry-pi-5", "jetson-orin", "generic-x86_64")
SITES = ("berlin", "paris", "tokyo")


@dataclass(frozen=True)
class FleetShape:
    """How many devices of each kind :func:`seed_inventory` made."""

    total: int
    online: int
    degraded: int
    stale: int
    offline: int
    canary: list[str]


def _kind(i: int) -> str:
    """Every 20th device offline, every 20th (shifted) degraded, every 25th stale."""
    if i % 20 == 7:
        return "offline"
    if i % 20 == 13:
        return "degraded"
    if i % 25 == 3:
        return "stale"
    return "online"


def device_id(i: int) -> str:
    return f"cam-{i:05d}"


def seed_inventory(db: Database, n: int, *, now: datetime, canary: int = 12) -> FleetShape:
    """``n`` devices: three profiles, ``face`` 1.2.0 (every 10th on 1.1.0) and ``vad``,
    site tags, and ``ring=canary`` on the first ``canary`` online devices."""
    kinds = [_kind(i) for i in range(n)]
    batches: dict[datetime, list[StatusReport]] = {}
    canaries: list[str] = []
    tags: list[dict[str, Any]] = []
    for i, kind in enumerate(kinds):
        dev = device_id(i)
        seen = now - timedelta(minutes=10) if kind == "stale" else now
        models = (
            ReportedModel("face", "1.1.0" if i % 10 == 9 else "1.2.0", "ready", "onnx", "CPU"),
            ReportedModel("vad", "0.4.0", "ready", "onnx", "CPU"),
        )
        state = "online" if kind == "stale" else kind
        report = StatusReport(
            device_id=dev,
            received_at=seen,
            ts=seen,
            state=state,
            agent_version="0.3.0" if i % 3 else "0.2.9",
            profile=PROFILES[i % len(PROFILES)],
            models=models,
            doc={"state": state},
        )
        batches.setdefault(seen, []).append(report)
        tags.append({"device_id": dev, "key": "site", "value": SITES[i % len(SITES)]})
        if kind == "online" and len(canaries) < canary and PROFILES[i % 3] != "generic-x86_64":
            canaries.append(dev)
            tags.append({"device_id": dev, "key": "ring", "value": "canary"})
    for seen in sorted(batches):  # one batch per "seen" time: last_seen is per batch
        reports = batches[seen]
        for start in range(0, len(reports), 5000):
            with db.write() as session:
                apply_batch(session, reports[start : start + 5000], auto_register=True)
    with db.write() as session:
        session.execute(insert(table_of(DeviceTagRow)), tags)
    return FleetShape(
        total=n,
        online=kinds.count("online"),
        degraded=kinds.count("degraded"),
        stale=kinds.count("stale"),
        offline=kinds.count("offline"),
        canary=canaries,
    )


def enrol(db: Database, device: str, *, profile: str = "raspberry-pi-5") -> None:
    """Enrol ``device`` (already auto-registered) with the facts an agent sends."""
    facts = {
        "arch": "aarch64",
        "agent_version": "0.3.0",
        "os": "Linux",
        "kernel": "6.6.31+rpt-rpi-2712",
        "python": "3.11.2",
        "profile": profile,
    }
    with db.write() as session:
        inventory.enrol_device(
            session,
            device_id=device,
            facts=facts,
            tags={},
            cert_serial="4f1c2a9e77d0b3c5",
            actor="enrolment:efe_test",
            stale_after=timedelta(seconds=30),
        )


class DeviceMessages:
    """Device messages through the real ingest path, into ``db``."""

    def __init__(self, db: Database) -> None:
        self.ingest = IngestService(
            db, IngestSettings(device_rate_per_s=100_000, device_burst=100_000)
        )

    def _submit(self, topic: str, doc: dict[str, Any], at: datetime) -> None:
        assert self.ingest.submit(topic, json.dumps(doc).encode(), received_at=at)

    def telemetry_hour(self, device: str, *, now: datetime, every_s: int = 60) -> None:
        """An hour of telemetry: CPU a sine around 40 %, temperature ~55 °C, memory
        ~1.2 of 4 GiB, ``face`` p95 ~20 ms with 1 % errors."""
        points = 3600 // every_s
        for k in range(points):
            at = now - timedelta(seconds=(points - k) * every_s)
            wave = math.sin(k / 6)
            doc = {
                "ts": format_timestamp(at),
                "seq": k,
                "system": {
                    "cpu_percent": round(40 + 25 * wave, 1),
                    "mem_used_bytes": int((1.2 + 0.1 * wave) * 2**30),
                    "mem_total_bytes": 4 * 2**30,
                    "agent_rss_bytes": 180 * 2**20,
                    "disk_free_bytes": 20 * 2**30,
                    "temperature_c": round(55 + 5 * wave, 1),
                },
                "models": {
                    "face": {
                        "requests": 600 * (k + 1),
                        "errors": {"golden_mismatch": 6 * (k + 1)},
                        "latency_ms": {"p50": 11.0, "p95": round(20 + 4 * wave, 2), "p99": 31.0},
                        "queue_depth": 0,
                        "provider": "CPU",
                    }
                },
            }
            self._submit(telemetry_topic(device), doc, now)
        self.ingest.flush()

    def status(self, device: str, *, at: datetime, face: str = "1.2.0") -> None:
        doc = {
            "state": "online",
            "ts": format_timestamp(at),
            "agent_version": "0.3.0",
            "profile": "raspberry-pi-5",
            "started_at": format_timestamp(at),
            "models": {
                "face": {"version": face, "state": "ready", "format": "onnx", "provider": "CPU"}
            },
        }
        self._submit(status_topic(device), doc, at)

    def update(
        self,
        device: str,
        rollout: int,
        *,
        at: datetime,
        outcome: str = "committed",
        to: str = "1.3.0",
        frm: str = "1.2.0",
    ) -> None:
        """A whole update as an agent reports it, ending in ``outcome``."""
        steps = ["downloading", "verifying", "validating", "activating", "probation"]
        if outcome != "probation":
            steps.append(outcome)
        for step in steps:
            doc: dict[str, Any] = {
                "ts": format_timestamp(at),
                "rollout_id": str(rollout),
                "model": "face",
                "from_version": frm,
                "to_version": to,
                "state": step,
            }
            if step in ("failed", "rolled_back"):
                doc["reason"] = {"code": "golden_mismatch", "message": "golden vector mismatch"}
            self._submit(update_topic(device), doc, at)
        if outcome == "committed":
            self.status(device, at=at, face=to)
        self.ingest.flush()
