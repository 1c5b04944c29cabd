"""``edge-fleet serve --workers N``: N processes answer HTTP, exactly one runs the ingest
and the rollout engine, and another takes over when that one dies."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import httpx
import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion

from fleet_server.workers import BackgroundLease, LeasedRunner
from tests.broker import Mosquitto
from tests.broker.mosquitto import free_port

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value is not None and value is not False:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_one_process_holds_the_lease_and_another_takes_over(tmp_path: Path) -> None:
    lock = tmp_path / "background.lock"
    started: list[str] = []
    a = LeasedRunner(BackgroundLease(lock), lambda: started.append("a"), lambda: None)
    b = LeasedRunner(BackgroundLease(lock), lambda: started.append("b"), lambda: None, retry_s=0.05)
    a.start()
    b.start()  # a separate open file description: flock refuses it, as for a process
    assert (a.running, b.running, started) == (True, False, ["a"])
    assert lock.read_text().strip() == str(os.getpid())
    a.stop()  # the holder ends: the other takes the work over
    wait_for("the takeover", lambda: b.running)
    assert started == ["a", "b"]
    b.stop()
    assert not b.running and not b.lease.held


def _status(client: paho.Client, device: str) -> None:
    ts = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    doc = {"state": "online", "ts": ts, "agent_version": "0.3.0", "profile": "raspberry-pi-5"}
    doc |= {"started_at": ts, "models": {}}
    client.publish(f"edge/{device}/status", json.dumps(doc), qos=1, retain=True).wait_for_publish(5)


def test_serve_with_two_workers(tmp_path: Path, fresh_mosquitto: Mosquitto) -> None:
    data, port = tmp_path / "data", free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "fleet_server.cli"]
    made = subprocess.run(
        [*cli, "token", "create", "--role", "admin", "--name", "t", "--data-dir", str(data)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    token = re.search(r"eft_\S+", made.stdout)
    assert token is not None
    serve = [*cli, "serve", "--data-dir", str(data), "--port", str(port), "--workers", "2"]
    serve += ["--mqtt-url", fresh_mosquitto.url, "--log-level", "warning"]
    log = (tmp_path / "serve.log").open("wb")
    server = subprocess.Popen(serve, env=env, stdout=log, stderr=subprocess.STDOUT)
    api = httpx.Client(
        base_url=f"http://127.0.0.1:{port}",
        headers={"Authorization": f"Bearer {token[0]}"},
        timeout=10,
    )
    mqtt = paho.Client(CallbackAPIVersion.VERSION2, client_id="test-workers")
    lock = data / "background.lock"
    try:
        master = psutil.Process(server.pid)

        def spawned() -> list[psutil.Process]:  # uvicorn's workers, not multiprocessing's
            return [  # resource tracker
                p for p in master.children() if "spawn_main" in " ".join(p.cmdline())
            ]

        workers = wait_for("two workers", lambda: len(spawned()) == 2 and spawned())

        def holder() -> int | None:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                return None
            return pid if pid in {w.pid for w in master.children()} else None

        first = wait_for("the background lease", holder)
        assert first in {w.pid for w in workers} and first != server.pid
        wait_for("the API", lambda: _ok(api, "/readyz"))
        mqtt.connect("127.0.0.1", fresh_mosquitto.port)
        mqtt.loop_start()
        _status(mqtt, "cam-1")
        wait_for("cam-1 ingested", lambda: _ok(api, "/api/v1/devices/cam-1"))

        os.kill(first, signal.SIGKILL)  # uvicorn starts a new worker; someone takes over
        second = wait_for("a new lease holder", lambda: (h := holder()) != first and h, 30)
        assert second != first
        _status(mqtt, "cam-2")
        wait_for("cam-2 ingested after the takeover", lambda: _ok(api, "/api/v1/devices/cam-2"))
    finally:
        mqtt.loop_stop()
        api.close()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    assert server.returncode == 0, (tmp_path / "serve.log").read_text()[-3000:]


def _ok(api: httpx.Client, path: str) -> bool:
    try:
        return api.get(path).status_code == 200
    except httpx.HTTPError:
        return False
