"""The ingest against a real Mosquitto and real databases: topics, retained status and Last
Will, flood control, malformed payloads, shared subscriptions, the MQTT 3.1.1 fallback,
acknowledgement after commit, and a throughput figure."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, select

from fleet_server.config import IngestSettings, MqttSettings
from fleet_server.domain import DeviceState
from fleet_server.ingest import IngestService
from fleet_server.ingest_mqtt import MqttIngest, subscriptions
from fleet_server.store import devices
from fleet_server.store.engine import Database
from fleet_server.store.models import TelemetryPointRow, UpdateEventRow
from tests.broker import Mosquitto, V311OnlyProxy, probe

pytestmark = pytest.mark.broker
STALE = timedelta(seconds=30)


def now_ts() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def status_doc(state: str = "online", **extra: Any) -> bytes:
    doc: dict[str, Any] = {"state": state, "ts": now_ts()}
    if state != "offline":
        doc |= {
            "agent_version": "0.3.0",
            "profile": "rpi5",
            "started_at": now_ts(),
            "models": {
                "face": {
                    "version": "1.3.0",
                    "state": "ready",
                    "format": "onnx",
                    "provider": "CPUExecutionProvider",
                }
            },
        }
    return json.dumps(doc | extra).encode()


def telemetry_doc(seq: int, requests: int = 0) -> bytes:
    return json.dumps(
        {
            "ts": now_ts(),
            "seq": seq,
            "system": {
                "cpu_percent": 12.5,
                "mem_used_bytes": 1000,
                "mem_total_bytes": 4000,
                "agent_rss_bytes": 100,
                "disk_free_bytes": 5000,
            },
            "models": {
                "face": {
                    "requests": requests,
                    "errors": {"bad_input": 1},
                    "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
                    "queue_depth": 0,
                    "provider": "CPUExecutionProvider",
                }
            },
        }
    ).encode()


def wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def count(db: Database, table: Any, **where: Any) -> int:
    stmt = select(func.count()).select_from(table)
    for key, value in where.items():
        stmt = stmt.where(getattr(table, key) == value)
    with db.read() as s:
        return int(s.scalar(stmt) or 0)


@contextmanager
def running_ingest(
    db: Database,
    url: str,
    prefix: str,
    protocol: Literal["auto", "5", "3.1.1"] = "auto",
    **ingest: Any,
) -> Iterator[tuple[IngestService, MqttIngest]]:
    settings = IngestSettings(**{"flush_interval_ms": 50, **ingest})
    service = IngestService(db, settings, topic_prefix=prefix)
    mqtt = MqttIngest(MqttSettings(url=url, topic_prefix=prefix, protocol=protocol), service)
    service.start()
    mqtt.start()
    try:
        assert mqtt.wait_connected(10), "the ingest did not connect"
        time.sleep(0.2)  # the SUBACK
        yield service, mqtt
    finally:
        mqtt.stop()
        service.stop()


@pytest.fixture
def prefix() -> str:
    """A topic prefix of the test's own (the session broker keeps retained messages)."""
    return f"t{uuid.uuid4().hex[:8]}/edge"


def test_reports_are_stored_under_the_device_of_the_topic(
    db: Database, mosquitto: Mosquitto, prefix: str
) -> None:
    with running_ingest(db, mosquitto.url, prefix) as (service, _), probe(mosquitto.port) as p:
        p.publish(f"{prefix}/cam-1/status", status_doc(device="evil"), qos=1, retain=True)
        for i in range(3):
            p.publish(f"{prefix}/cam-1/telemetry", telemetry_doc(i, requests=10 * i), qos=0)
        update = {
            "ts": now_ts(),
            "rollout_id": "r-1",
            "model": "face",
            "from_version": "1.2.0",
            "to_version": "1.3.0",
            "state": "failed",
            "reason": {"code": "golden_mismatch", "message": "off by 0.5"},
        }
        p.publish(f"{prefix}/cam-1/update", json.dumps(update).encode(), qos=1)
        p.publish(f"{prefix}/cam-1/infer/face", b"{}", qos=0)  # not the ingest's business
        wait_until(lambda: count(db, UpdateEventRow) == 1 and count(db, TelemetryPointRow) == 3)
    with db.read() as s:
        d = devices.get_device(s, "cam-1", stale_after=STALE)
        assert devices.list_devices(s, devices.DeviceFilter(), stale_after=STALE).items == [d]
    assert d.state is DeviceState.ONLINE and d.agent_version == "0.3.0"
    assert [(m.name, m.version, m.provider) for m in d.models] == [
        ("face", "1.3.0", "CPUExecutionProvider")
    ]
    assert service.stats.written == 5 and service.stats.malformed == 0


def test_retained_status_at_start_and_last_will(
    db: Database, mosquitto: Mosquitto, prefix: str
) -> None:
    with probe(mosquitto.port) as p:
        p.publish(f"{prefix}/cam-2/status", status_doc(), qos=1, retain=True)
    device = paho.Client(
        CallbackAPIVersion.VERSION2, client_id=f"dev-{prefix}", protocol=paho.MQTTv5
    )
    device.will_set(f"{prefix}/cam-3/status", status_doc("offline"), qos=1, retain=True)
    device.connect("127.0.0.1", mosquitto.port, keepalive=5)
    device.loop_start()
    device.publish(f"{prefix}/cam-3/status", status_doc(), qos=1, retain=True).wait_for_publish(5)

    def state(dev: str) -> str | None:
        with db.read() as s:
            found = devices.list_devices(s, devices.DeviceFilter(), stale_after=STALE).items
        return next((d.state.value for d in found if d.id == dev), None)

    with running_ingest(db, mosquitto.url, prefix):
        wait_until(lambda: state("cam-2") == "online" and state("cam-3") == "online")
        device.loop_stop()
        sock = device.socket()
        assert sock is not None
        sock.close()  # the device vanishes without DISCONNECT: the broker sends its will
        wait_until(lambda: state("cam-3") == "offline", timeout=15)
    assert state("cam-2") == "online"


def test_a_flood_is_rate_limited_without_stalling_others(
    sqlite_db: Database, mosquitto: Mosquitto, prefix: str
) -> None:
    db = sqlite_db
    with (
        running_ingest(db, mosquitto.url, prefix, device_rate_per_s=1.0, device_burst=10) as (
            service,
            _,
        ),
        probe(mosquitto.port) as p,
    ):
        for i in range(200):
            p.client.publish(f"{prefix}/flood/telemetry", telemetry_doc(i), qos=0)
        p.client.publish(f"{prefix}/bad/telemetry", b"{not json", qos=0)
        p.client.publish(f"{prefix}/bad/telemetry", json.dumps({"ts": now_ts()}).encode(), qos=0)
        for i in range(5):
            p.publish(f"{prefix}/calm/telemetry", telemetry_doc(i), qos=0)
        wait_until(lambda: count(db, TelemetryPointRow, device_id="calm") == 5)
        wait_until(lambda: service.stats.received >= 207)
        service.flush()
    flood = count(db, TelemetryPointRow, device_id="flood")
    assert 10 <= flood <= 13  # the burst, plus what the refill allowed
    assert service.stats.rate_limited == 200 - flood
    assert service.stats.per_device["flood"]["rate_limited"] == 200 - flood
    assert service.stats.per_device["bad"] == {"malformed": 2}
    assert count(db, TelemetryPointRow, device_id="bad") == 0


def test_replicas_in_a_share_group_split_the_telemetry(
    sqlite_db: Database, mosquitto: Mosquitto, prefix: str
) -> None:
    db = sqlite_db
    with (
        running_ingest(db, mosquitto.url, prefix) as (a, _),
        running_ingest(db, mosquitto.url, prefix) as (b, _),
        probe(mosquitto.port) as p,
    ):
        for i in range(200):
            p.client.publish(f"{prefix}/cam-{i % 20}/telemetry", telemetry_doc(i), qos=1)
        wait_until(lambda: count(db, TelemetryPointRow) >= 200)
        time.sleep(0.3)
    assert count(db, TelemetryPointRow) == 200  # each message stored once
    assert a.stats.written > 0 and b.stats.written > 0
    assert a.stats.written + b.stats.written == 200


def test_mqtt311_broker_falls_back_to_plain_subscriptions(
    sqlite_db: Database, mosquitto: Mosquitto, prefix: str
) -> None:
    proxy = V311OnlyProxy(mosquitto.port)
    try:
        with running_ingest(sqlite_db, f"mqtt://127.0.0.1:{proxy.port}", prefix) as (_, mqtt):
            assert mqtt.protocol == "3.1.1" and proxy.refused_v5 >= 1
            with probe(mosquitto.port) as p:
                p.publish(f"{prefix}/old/telemetry", telemetry_doc(1), qos=1)
            wait_until(lambda: count(sqlite_db, TelemetryPointRow) == 1)
    finally:
        proxy.close()
    settings = MqttSettings(url="mqtt://x", topic_prefix="edge", share_group="g")
    assert subscriptions(settings, mqtt5=True) == [
        "$share/g/edge/+/telemetry",
        "$share/g/edge/+/update",
        "edge/+/status",
    ]
    assert subscriptions(settings, mqtt5=False)[0] == "edge/+/telemetry"


def test_nothing_is_acknowledged_before_it_is_committed(tmp_path: Any) -> None:
    """A locked database makes the writer retry; the QoS 1 ack waits for the commit."""
    path = tmp_path / "fleet.db"
    db = Database(f"sqlite:///{path}", busy_timeout_ms=50)
    from fleet_server.store import migrate

    migrate.upgrade(db)
    service = IngestService(db, IngestSettings(flush_interval_ms=20))
    acked = threading.Event()
    lock = sqlite3.connect(path)
    lock.execute("BEGIN EXCLUSIVE")
    service.start()
    try:
        topic = "edge/cam-9/update"
        body = {
            "ts": now_ts(),
            "rollout_id": None,
            "model": "face",
            "from_version": None,
            "to_version": "1.0.0",
            "state": "committed",
        }
        assert service.submit(topic, json.dumps(body).encode(), ack=acked.set)
        wait_until(lambda: service.stats.db_retries >= 2)
        assert not acked.is_set()
        lock.rollback()
        assert acked.wait(5)
        assert count(db, UpdateEventRow) == 1
    finally:
        lock.close()
        service.stop()
        db.dispose()


@pytest.mark.slow
def test_ingest_throughput(db: Database, mosquitto: Mosquitto, prefix: str) -> None:
    """Prints msgs/s for the lead to quote (asserts only that nothing is lost)."""
    n_devices, per_device = 500, 12
    total = n_devices * per_device
    payloads = [telemetry_doc(i, requests=i) for i in range(per_device)]
    with (
        running_ingest(db, mosquitto.url, prefix, device_burst=100) as (service, _),
        probe(mosquitto.port) as p,
    ):
        t0 = time.perf_counter()
        for i in range(per_device):
            for d in range(n_devices):
                p.client.publish(f"{prefix}/dev-{d}/telemetry", payloads[i], qos=0)
        wait_until(lambda: service.stats.written >= total, timeout=60)
        elapsed = time.perf_counter() - t0
    assert count(db, TelemetryPointRow) == total
    print(
        f"\ningest throughput ({db.dialect}): {total} telemetry messages from {n_devices} devices"
        f" in {elapsed:.2f}s = {total / elapsed:,.0f} msgs/s, {service.stats.batches} batches"
    )
