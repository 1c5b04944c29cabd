"""The life of an ``edge-agent run`` process over a real Mosquitto: a broker killed and
restarted, a hot reload under load, SIGTERM, ``kill -9`` and its Last Will, an invalid config.

The module has a broker of its own (it is killed and restarted) and one agent that lives
through the tests in order: broker restart, reload, SIGTERM. The Last Will test runs a
second agent behind a proxy that refuses MQTT 5, so that it also serves over 3.1.1.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.bundle import sha256_file
from agent.protocol import encode_request, format_timestamp, utc_now
from tests import modelgen
from tests.agent.agent_process import (
    AgentProcess,
    run_agent_once,
    running_agent,
    status_of,
    write_config,
)
from tests.agent.daemon_client import MqttClient
from tests.broker import Mosquitto, V311OnlyProxy

pytestmark = pytest.mark.broker

DEVICE = "daemon-life"
W, B = modelgen.affine_weights(3, 2)
X = np.array([[1.0, -2.0, 0.5]], np.float32)
TELEMETRY = f"edge/{DEVICE}/telemetry"
#: The agent waits 1-2 s before reconnecting: time for the test's observer to subscribe first.
SLOW_RECONNECT = {"reconnect": {"min_s": 2.0, "max_s": 2.0}}


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path_factory.mktemp("life-broker")).start()
    yield b
    b.kill()


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("daemon-life")


def first_models(folder: Path) -> list[dict[str, Any]]:
    broken = folder / "models" / "fixed-later.onnx"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"truncated" * 10)
    return [
        {"name": "affine", "path": modelgen.make_onnx_affine(folder / "models" / "affine.onnx")},
        {"name": "fixed-later", "path": broken},
        {"name": "gone", "path": modelgen.make_onnx_probe(folder / "models" / "gone.onnx")},
    ]


@pytest.fixture(scope="module")
def daemon(broker: Mosquitto, folder: Path) -> Iterator[AgentProcess]:
    with running_agent(
        folder,
        broker.port,
        first_models(folder),
        device=DEVICE,
        mqtt=SLOW_RECONNECT,
        telemetry={"interval_s": 0.25, "qos": 1},
    ) as proc:
        yield proc


def affine_request(client: MqttClient, qos: int = 1) -> tuple[str, float]:
    return client.send("affine", encode_request([(None, X)]), device=DEVICE, qos=qos)


def test_invalid_config_exits_non_zero_naming_the_field(tmp_path: Path) -> None:
    model = {"name": "m", "path": modelgen.make_onnx_probe(tmp_path / "m.onnx")}
    cases: dict[str, dict[str, Any]] = {
        "models.0.queue_size": {"models": [{**model, "queue_size": 0}]},
        "telemetry.interval": {"telemetry": {"interval": 5}},  # a misspelt key
        "device_id": {"device_id": "no/slashes"},
    }
    for field, override in cases.items():
        args: dict[str, Any] = {"models": [model], **override}
        path = write_config(
            tmp_path / "agent.yaml", url="mqtt://127.0.0.1:1", state_dir=tmp_path, **args
        )
        proc = run_agent_once(path)
        assert proc.returncode == 2, proc.stderr
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: config_invalid: ") and field in last, proc.stderr
        assert "Traceback" not in proc.stderr


def test_broker_restart_reconnects_serves_and_keeps_telemetry_seq(
    broker: Mosquitto, daemon: AgentProcess
) -> None:
    before = MqttClient(broker.port)
    before.subscribe(TELEMETRY)
    seqs = [before.expect(TELEMETRY).json()["seq"] for _ in range(2)]
    broker.kill()
    down_at = time.monotonic()
    time.sleep(0.5)
    broker.start()  # empty: no session, no retained status
    after = MqttClient(broker.port)
    after.subscribe(TELEMETRY)
    after.subscribe(f"edge/{DEVICE}/status")
    assert time.monotonic() - down_at < 0.95, "the observer must subscribe before the agent is back"
    status = after.expect(f"edge/{DEVICE}/status", 10)
    back_in = time.monotonic() - down_at
    assert status.retain is False and status.json()["state"] == "degraded"  # the birth
    seqs += [m.json()["seq"] for m in before.drain(TELEMETRY)]
    while max(seqs) < seqs[0] + 8:
        seqs.append(after.expect(TELEMETRY, 5).json()["seq"])
    missing = sorted(set(range(seqs[0], max(seqs) + 1)) - set(seqs))
    print(f"\nbroker restart: agent back after {back_in:.2f} s; telemetry seqs {seqs}")
    assert missing == [], f"telemetry lost across the restart: {missing}"
    assert seqs == sorted(seqs), "telemetry out of order"
    assert status_of(after, DEVICE)["state"] == "degraded"  # the retained status is back
    topic, _ = affine_request(after)
    np.testing.assert_array_equal(after.expect(topic).response().outputs[0].array, X @ W + B)
    before.close()
    after.close()


def command(client: MqttClient, cmd: str, cid: str) -> dict[str, Any]:
    client.subscribe(f"edge/{DEVICE}/cmd/reply")
    doc = {"id": cid, "command": cmd, "ts": format_timestamp(utc_now())}
    client.publish(f"edge/{DEVICE}/cmd", json.dumps(doc).encode())
    return client.expect_where(  # type: ignore[no-any-return]
        f"edge/{DEVICE}/cmd/reply", lambda m: m.json()["id"] == cid, 20
    ).json()


class Load:
    """Requests to ``affine`` every few milliseconds on a thread, until stopped."""

    def __init__(self, client: MqttClient) -> None:
        self.client = client
        self.topics: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.topics.append(affine_request(self.client, qos=0)[0])
            time.sleep(0.003)

    def stop(self) -> list[str]:
        """Stop sending; the model version of every reply, in the order requests were sent."""
        self._stop.set()
        self._thread.join()
        versions = []
        for topic in self.topics:
            reply = self.client.expect(topic, 10).response()
            np.testing.assert_array_equal(reply.outputs[0].array, X @ W + B)
            versions.append(reply.model_version)
        return versions


def test_reload_hot_swaps_adds_and_removes_models_under_load(
    broker: Mosquitto, daemon: AgentProcess, folder: Path
) -> None:
    client = MqttClient(broker.port)
    models = first_models(folder)
    old = "sha256:" + sha256_file(Path(models[0]["path"]))[:12]
    # A config that is invalid is refused, and nothing changes.
    daemon.config_path.write_text(daemon.config_path.read_text() + "\nbogus_key: 1\n")
    refused = command(client, "reload", "r-0")
    assert (
        refused["error"]["code"] == "config_invalid" and "bogus_key" in refused["error"]["message"]
    )
    # A model file that does not load is reported, and the model keeps its version.
    bad = folder / "models" / "affine-bad.onnx"
    bad.write_bytes(b"\x00garbage" * 30)
    write_config(
        daemon.config_path,
        url=broker.url,
        state_dir=folder / "state",
        models=[{**models[0], "path": bad}, *models[1:]],
        device_id=DEVICE,
        mqtt=SLOW_RECONNECT,
        telemetry={"interval_s": 0.25, "qos": 1},
    )
    failed = command(client, "reload", "r-bad")["result"]
    assert failed["unchanged"] == ["gone"] and failed["reloaded"] == []
    assert {k: v["code"] for k, v in failed["failed"].items()} == {
        "affine": "model_load_failed",
        "fixed-later": "model_load_failed",
    }
    topic, _ = affine_request(client)
    assert client.expect(topic).response().model_version == old
    # The new config: affine's file changes (same maths, another graph), the broken model
    # is fixed, "gone" goes, "q" comes.
    new_path = modelgen.make_onnx_affine(folder / "models" / "affine.onnx", dynamic_batch=False)
    new = "sha256:" + sha256_file(new_path)[:12]
    assert new != old
    modelgen.make_onnx_probe(Path(models[1]["path"]))
    models = [
        models[0],
        models[1],
        {"name": "q", "path": modelgen.make_tflite_quantized_add(folder / "models" / "q.tflite")},
    ]
    write_config(
        daemon.config_path,
        url=broker.url,
        state_dir=folder / "state",
        models=models,
        device_id=DEVICE,
        mqtt=SLOW_RECONNECT,
        telemetry={"interval_s": 0.25, "qos": 1},
    )
    load = Load(client)
    time.sleep(0.1)
    result = command(client, "reload", "r-1")["result"]
    time.sleep(0.1)
    versions = load.stop()
    assert result == {
        "added": ["q"],
        "removed": ["gone"],
        "reloaded": ["affine", "fixed-later"],
        "unchanged": [],
        "failed": {},
    }
    # Every request was answered with a result; the old version, then only the new one.
    switch = versions.index(new)
    print(
        f"\nreload under load: {len(versions)} requests, {switch} on the old version, all answered"
    )
    assert switch > 0 and versions[:switch] == [old] * switch
    assert versions[switch:] == [new] * (len(versions) - switch)
    status = status_of(client, DEVICE)
    assert status["state"] == "online"  # the failed model is fixed
    assert {k: v["state"] for k, v in status["models"].items()} == {
        "affine": "ready",
        "fixed-later": "ready",
        "q": "ready",
    }
    assert status["models"]["affine"]["version"] == new
    gone = client.request(
        "gone", encode_request([(None, np.zeros((1, 4), np.float32))]), device=DEVICE
    ).error()
    assert gone.code == "unknown_model"
    client.close()


def test_sigterm_publishes_offline_and_exits_0(broker: Mosquitto, daemon: AgentProcess) -> None:
    assert daemon.stop() == 0
    client = MqttClient(broker.port)
    status = status_of(client, DEVICE)
    client.close()
    assert status["state"] == "offline" and "ts" in status
    assert "signal 15: shutting down" in daemon.log()
    daemon.assert_clean_log()


def test_kill_9_leaves_the_last_will_and_v311_serves(mosquitto: Mosquitto, tmp_path: Path) -> None:
    proxy = V311OnlyProxy(mosquitto.port)  # the agent falls back to MQTT 3.1.1
    device = "daemon-lwt"
    models = [{"name": "affine", "path": modelgen.make_onnx_affine(tmp_path / "a.onnx")}]
    try:
        with running_agent(
            tmp_path, mosquitto.port, models, device=device, url=f"mqtt://127.0.0.1:{proxy.port}"
        ) as proc:
            assert proxy.refused_v5 >= 1 and proxy.accepted >= 1
            client = MqttClient(mosquitto.port)
            topic = client.new_reply_topic()  # MQTT 5 properties are lost on the way:
            payload = encode_request([(None, X)], request_id="via-311", reply_to=topic)
            client.send("affine", payload, device=device, reply_topic=topic)
            reply = client.expect(topic)
            response = reply.response()  # ...the body's reply_to and id route the reply
            assert response.id == "via-311" and reply.correlation_data is None
            np.testing.assert_array_equal(response.outputs[0].array, X @ W + B)
            assert status_of(client, device)["state"] == "online"
            proc.kill()
            will = client.expect_where(
                f"edge/{device}/status", lambda m: m.json()["state"] != "online"
            )
            assert will.json()["state"] == "offline" and "ts" in will.json()
            assert status_of(client, device)["state"] == "offline"  # retained
            client.close()
    finally:
        proxy.close()
