#!/usr/bin/env python3
"""Fleet server benchmark: MQTT ingest throughput and the API's filtered device page.

With 10,000 registered devices (status, tags, a reported model each), on SQLite and/or
PostgreSQL, it measures:

1. ingest: telemetry messages published through a real Mosquitto (started here on a free
   port) until all are committed, in msgs/s;
2. API: p50/p99 of ``GET /api/v1/devices?tag=site=...&state=online&model=...&limit=100``
   over HTTP against ``edge-fleet serve`` in its own process (token check included).

    benchmarks/server_ingest.py [--db sqlite|postgresql|both] [--devices 10000]
                                [--messages 20000] [--requests 300]

PostgreSQL: 127.0.0.1:5432, user postgres (a scratch database is created and dropped).
The publisher runs on the same machine, so the ingest figure is a lower bound.
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import httpx
import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fleet_server.auth import mint
from fleet_server.config import IngestSettings, MqttSettings
from fleet_server.domain import ReportedModel, Role, utcnow
from fleet_server.ingest import IngestService
from fleet_server.ingest_mqtt import MqttIngest
from fleet_server.store import migrate, tokens
from fleet_server.store.device_reports import StatusReport, apply_batch
from fleet_server.store.engine import Database
from fleet_server.store.models import DeviceTagRow, table_of

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def mosquitto(workdir: Path) -> Iterator[int]:
    port = free_port()
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\n"
        "max_queued_messages 0\nuser root\n"
    )
    proc = subprocess.Popen(
        ["/usr/sbin/mosquitto", "-c", str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError("mosquitto did not start") from None
            time.sleep(0.05)
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(5)


@contextmanager
def database(kind: str, workdir: Path) -> Iterator[Database]:
    if kind == "sqlite":
        db = Database(f"sqlite:///{workdir / 'fleet.db'}")
        migrate.upgrade(db)
        yield db
        db.dispose()
        return
    name = f"fleet_bench_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    db = Database(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
    try:
        migrate.upgrade(db)
        yield db
    finally:
        db.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def register(db: Database, n: int) -> None:
    now = utcnow()
    for start in range(0, n, 2000):
        reports = [
            StatusReport(
                device_id=f"dev-{i:05d}",
                received_at=now,
                ts=now,
                state="online",
                agent_version="0.3.0",
                profile=("rpi5", "jetson-orin", "coral-usb")[i % 3],
                models=(ReportedModel("face", ("1.2.0", "1.3.0")[i % 2], "ready", "onnx", "CPU"),),
            )
            for i in range(start, min(n, start + 2000))
        ]
        with db.write() as s:
            apply_batch(s, reports)
    with db.write() as s:
        s.execute(
            table_of(DeviceTagRow).insert(),
            [{"device_id": f"dev-{i:05d}", "key": "site", "value": f"s{i % 20}"} for i in range(n)],
        )


def telemetry(seq: int) -> bytes:
    ts = datetime.now(UTC).isoformat().replace("+00:00", "Z")
    return json.dumps(
        {
            "ts": ts,
            "seq": seq,
            "system": {
                "cpu_percent": 12.5,
                "mem_used_bytes": 1000,
                "mem_total_bytes": 4000,
                "agent_rss_bytes": 100,
                "disk_free_bytes": 5000,
                "temperature_c": 48.0,
            },
            "models": {
                "face": {
                    "requests": seq,
                    "errors": {},
                    "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": 3.0},
                    "queue_depth": 0,
                    "provider": "CPUExecutionProvider",
                }
            },
        }
    ).encode()


def bench_ingest(db: Database, port: int, n_devices: int, n_messages: int) -> float:
    service = IngestService(db, IngestSettings(), topic_prefix="edge")
    mqtt = MqttIngest(MqttSettings(url=f"mqtt://127.0.0.1:{port}"), service)
    service.start()
    mqtt.start()
    if not mqtt.wait_connected(10):
        raise RuntimeError("ingest did not connect")
    time.sleep(0.5)
    pub = paho.Client(CallbackAPIVersion.VERSION2, protocol=paho.MQTTv5)
    pub.max_queued_messages_set(0)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    payload = telemetry(1)
    t0 = time.perf_counter()
    for i in range(n_messages):
        pub.publish(f"edge/dev-{i % n_devices:05d}/telemetry", payload, qos=0)
    deadline = time.monotonic() + 120
    while service.stats.written < n_messages and time.monotonic() < deadline:
        time.sleep(0.02)
    elapsed = time.perf_counter() - t0
    pub.disconnect()
    pub.loop_stop()
    mqtt.stop()
    service.stop()
    lost = n_messages - service.stats.written
    print(
        f"  ingest: {service.stats.written} msgs in {elapsed:.2f}s = "
        f"{service.stats.written / elapsed:,.0f} msgs/s ({service.stats.batches} batches, "
        f"{lost} not written, rate-limited {service.stats.rate_limited})"
    )
    return service.stats.written / elapsed


@contextmanager
def api_server(db: Database, workdir: Path) -> Iterator[str]:
    """``edge-fleet serve`` in its own process (what production runs), on a free port."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "fleet_server.cli",
        "serve",
        "--database-url",
        db.url,
        "--data-dir",
        str(workdir),
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=Path(__file__).resolve().parent.parent)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                httpx.get(f"{url}/readyz", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(15)


def bench_api(db: Database, workdir: Path, n_requests: int) -> float:
    secret = mint()
    with db.write() as s:
        tokens.create_api_token(
            s,
            name="bench",
            role=Role.VIEWER,
            token_hash=secret.hash,
            prefix=secret.prefix,
            actor="bench",
        )
    queries: list[dict[str, str | int]] = [
        {
            "tag": f"site=s{(2 * i + 1) % 20}",
            "state": "online",
            "model": "face",
            "model_version": "1.3.0",
            "limit": 100,
        }
        for i in range(n_requests)
    ]
    with (
        api_server(db, workdir) as url,
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {secret.token}"}) as client,
    ):
        for q in queries[:20]:  # warm up: connections, caches
            client.get("/api/v1/devices", params=q).raise_for_status()
        times = []
        for q in queries:
            t0 = time.perf_counter()
            r = client.get("/api/v1/devices", params=q)
            times.append((time.perf_counter() - t0) * 1000)
            if r.status_code != 200 or len(r.json()["items"]) != 100:
                raise RuntimeError(f"unexpected answer: {r.status_code} {r.text[:200]}")
    times.sort()
    p50, p99 = statistics.median(times), times[int(len(times) * 0.99) - 1]
    print(
        f"  API filtered device page over HTTP (100 of 500 matches; tag+state+model): "
        f"p50 {p50:.1f} ms, p99 {p99:.1f} ms"
    )
    return p99


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--db", choices=["sqlite", "postgresql", "both"], default="both")
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    kinds = ["sqlite", "postgresql"] if args.db == "both" else [args.db]
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    try:
        with mosquitto(work) as port:
            for kind in kinds:
                print(f"{kind}: {args.devices} devices")
                (work / kind).mkdir()
                with database(kind, work / kind) as db:
                    t0 = time.perf_counter()
                    register(db, args.devices)
                    with db.write() as s:  # what autovacuum / PRAGMA optimize do in service
                        s.execute(text("ANALYZE"))
                    print(f"  registered in {time.perf_counter() - t0:.1f}s")
                    bench_ingest(db, port, args.devices, args.messages)
                    bench_api(db, work / kind, args.requests)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
