"""``edge-agent run`` under load over a real Mosquitto: overload, deadlines, micro-batching,
telemetry, operator commands, and a fuzz of malformed requests.

One agent process serves the module (its models: :func:`standard_models`), with telemetry
every 0.4 s. The ``slow`` model runs as long as a request asks (an ONNX Loop), which is how
the queue is filled and deadlines are made to pass. Timings are printed for the record
(``pytest -s``), and asserted only loosely.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.protocol import (
    RequestParameters,
    TelemetryDocument,
    decode_document,
    encode_request,
    format_timestamp,
    utc_now,
)
from tests import modelgen
from tests.agent.agent_process import AgentProcess, running_agent
from tests.agent.daemon_client import MqttClient
from tests.agent.daemon_models import calibrate_slow, standard_models
from tests.broker import Mosquitto

pytestmark = pytest.mark.broker

DEVICE = "daemon-load"
W, B = modelgen.affine_weights(3, 2)
X4 = np.array([[1.0, 2.0, 3.0, -1.0]], np.float32)
TELEMETRY = f"edge/{DEVICE}/telemetry"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory, models_dir: Path) -> list[dict[str, Any]]:
    vad = {"name": "vad", "path": models_dir / "silero_vad.onnx"}  # a real model
    return [*standard_models(tmp_path_factory.mktemp("daemon-load-models")), vad]


@pytest.fixture(scope="module")
def daemon(
    mosquitto: Mosquitto, models: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    folder = tmp_path_factory.mktemp("daemon-load")
    telemetry = {"interval_s": 0.4}
    with running_agent(folder, mosquitto.port, models, device=DEVICE, telemetry=telemetry) as proc:
        yield proc
        assert proc.alive
    proc.assert_clean_log()


@pytest.fixture(scope="module")
def client(mosquitto: Mosquitto, daemon: AgentProcess) -> Iterator[MqttClient]:
    c = MqttClient(mosquitto.port)
    c.subscribe(TELEMETRY)
    yield c
    c.close()


@pytest.fixture(scope="module")
def iteration_s(models: list[dict[str, Any]]) -> float:
    """Seconds per Loop iteration of the ``slow`` model on this machine."""
    return calibrate_slow(Path(next(m["path"] for m in models if m["name"] == "slow")))


def slow_request(n: int, rid: str, **params: Any) -> bytes:
    parameters = RequestParameters(**params) if params else None
    return encode_request(
        [("x", X4), ("n", np.array(n, np.int64))], request_id=rid, parameters=parameters
    )


def next_telemetry(client: MqttClient, timeout: float = 5.0) -> dict[str, Any]:
    doc: dict[str, Any] = client.expect(TELEMETRY, timeout).json()
    return doc


# --- overload and deadlines ---------------------------------------------------------------


def test_full_queue_is_answered_at_once_and_late_requests_are_not_run(
    client: MqttClient, iteration_s: float
) -> None:
    n_block = int(1.8 / iteration_s)  # the Expiry Interval is 1 s at least
    blocker, _ = client.send("slow", slow_request(n_block, "block"), device=DEVICE)
    time.sleep(0.15)  # the worker takes the blocker: the queue (4) is empty again
    queued = {
        "by-deadline": client.send("slow", slow_request(5, "a", deadline_ms=100), device=DEVICE),
        "by-expiry": client.send("slow", slow_request(5, "b"), device=DEVICE, expiry_s=1),
        "earlier-wins": client.send(
            "slow", slow_request(5, "c", deadline_ms=60_000), device=DEVICE, expiry_s=1
        ),
        "in-time": client.send("slow", slow_request(7, "d", deadline_ms=60_000), device=DEVICE),
    }
    latencies = []
    for i in range(5):
        topic, t0 = client.send("slow", slow_request(1, f"over-{i}"), device=DEVICE)
        reply = client.expect(topic, 2.0)
        latencies.append((reply.at - t0) * 1000)
        err = reply.error()
        assert (err.code, err.id) == ("overloaded", f"over-{i}")
        assert "4 requests waiting" in err.message
    print(
        f"\noverloaded reply: median {statistics.median(latencies):.2f} ms, "
        f"max {max(latencies):.2f} ms (publish to reply, QoS 1)"
    )
    assert max(latencies) < 200  # answered at once, not after the blocker

    done = client.expect(blocker, 10).response()
    assert done.timing is not None
    print(f"blocker ran {done.timing.inference_ms:.0f} ms")
    np.testing.assert_array_equal(done.outputs[0].array, n_block * X4)
    for name in ("by-deadline", "by-expiry", "earlier-wins"):
        err = client.expect(queued[name][0], 5).error()
        assert err.code == "deadline_exceeded", name
        assert "the deadline passed after" in err.message
    ok = client.expect(queued["in-time"][0], 5).response()
    assert ok.id == "d"
    np.testing.assert_array_equal(ok.outputs[0].array, 7 * X4)

    slow = client.expect_where(
        TELEMETRY, lambda m: m.json()["models"]["slow"]["requests"] == 10, 5
    ).json()["models"]["slow"]
    assert slow["errors"] == {"overloaded": 5, "deadline_exceeded": 3}


# --- micro-batching and latency --------------------------------------------------------------


def test_concurrent_requests_are_micro_batched_with_exact_outputs(client: MqttClient) -> None:
    xs = [np.array([[i, -i, 0.5 * i]], np.float32) for i in range(16)]
    sent = [client.send("affine", encode_request([(None, x)]), device=DEVICE, qos=0) for x in xs]
    replies = [client.expect(topic, 5).response() for topic, _ in sent]
    for x, reply in zip(xs, replies, strict=True):
        np.testing.assert_array_equal(reply.outputs[0].array, x @ W + B)
    runs = {r.timing.inference_ms for r in replies if r.timing is not None}
    print(f"\n16 concurrent requests ran in {len(runs)} batch(es)")
    assert len(runs) < 16  # replies of one batch share its inference time


def test_end_to_end_latency_of_tiny_models(client: MqttClient) -> None:
    one = np.ones((1, 4), np.float32)
    cases = {
        "two (ONNX, max_batch 1)": ("two", encode_request([("a", one), ("b", one)])),
        "q (int8 TFLite)": ("q", encode_request([(None, one)])),
        "affine (ONNX, max_batch 8, max_delay_ms 5)": (
            "affine",
            encode_request([(None, one[:, :3])]),
        ),
    }
    p50s = {}
    for label, (model, payload) in cases.items():
        times = []
        for _ in range(100):
            topic, t0 = client.send(model, payload, device=DEVICE)
            times.append((client.expect(topic, 5).at - t0) * 1000)
        q = np.percentile(times, [50, 95, 99])
        p50s[model] = q[0]
        print(
            f"\nend to end over Mosquitto (MQTT 5, QoS 1), {label}: "
            f"p50 {q[0]:.2f} ms, p95 {q[1]:.2f} ms, p99 {q[2]:.2f} ms"
        )
    assert p50s["two"] < 30 and p50s["q"] < 30


def test_a_real_model_over_mqtt(client: MqttClient, models_dir: Path) -> None:
    t = np.arange(512, dtype=np.float32) / 16000
    chunk = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t))[None, :]
    feeds: dict[str, np.ndarray] = {
        "input": chunk.astype(np.float32),
        "state": np.zeros((2, 1, 128), np.float32),
        "sr": np.array(16000, np.int64),
    }
    session = ort.InferenceSession(
        str(models_dir / "silero_vad.onnx"), providers=["CPUExecutionProvider"]
    )
    expected = dict(
        zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True)
    )
    params = RequestParameters(binary_outputs=True)
    payload = encode_request(list(feeds.items()), request_id="vad", parameters=params, binary=True)
    reply = client.request("vad", payload, device=DEVICE).response()
    got = {t.name: t.array for t in reply.outputs}
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6)


# --- telemetry ----------------------------------------------------------------------------


def test_telemetry_counts_requests_errors_and_latency(client: MqttClient) -> None:
    client.drain(TELEMETRY)
    before = next_telemetry(client)["models"]["two"]
    a = np.ones((1, 4), np.float32)
    for _ in range(6):
        payload = encode_request([("a", a), ("b", a)])
        client.request("two", payload, device=DEVICE).response()
    for _ in range(2):
        client.request("two", encode_request([("a", a), ("c", a)]), device=DEVICE).error()
    docs = [next_telemetry(client)]
    while docs[-1]["models"]["two"]["requests"] < before["requests"] + 8 or len(docs) < 3:
        docs.append(next_telemetry(client))
    docs.append(next_telemetry(client))  # an interval without requests
    for doc in docs:
        decode_document(TelemetryDocument, json.dumps(doc).encode())
        assert {
            "cpu_percent",
            "mem_used_bytes",
            "mem_total_bytes",
            "agent_rss_bytes",
            "disk_free_bytes",
        } <= doc["system"].keys()
        assert {"requests", "errors", "latency_ms", "queue_depth", "provider"} <= doc["models"][
            "two"
        ].keys()
    seqs = [d["seq"] for d in docs]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs
    after = docs[-1]["models"]["two"]
    assert after["requests"] == before["requests"] + 8
    bad = before["errors"].get("bad_input", 0) + 2
    assert after["errors"] == {**before["errors"], "bad_input": bad}
    assert after["provider"] == "CPUExecutionProvider" and after["queue_depth"] == 0
    latencies = [d["models"]["two"]["latency_ms"] for d in docs]
    measured = [lat for lat in latencies if lat is not None]
    assert measured, latencies
    for lat in measured:
        assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"] < 1000
    assert latencies[-1] is None  # nothing answered in the last interval


# --- operator commands ------------------------------------------------------------------------


def command(client: MqttClient, cmd: str, cid: str, **args: Any) -> dict[str, Any]:
    topic = f"edge/{DEVICE}/cmd/reply"
    client.subscribe(topic)
    doc = {"id": cid, "command": cmd, "args": args, "ts": format_timestamp(utc_now())}
    client.publish(f"edge/{DEVICE}/cmd", json.dumps(doc).encode())
    reply: dict[str, Any] = client.expect_where(topic, lambda m: m.json()["id"] == cid, 15).json()
    return reply


def test_ping_and_diagnostics_commands(client: MqttClient) -> None:
    pong = command(client, "ping", "c-1")
    assert pong["result"]["pong"] is True and pong["result"]["uptime_s"] > 0
    diag = command(client, "diagnostics", "c-2")["result"]
    assert diag["mqtt"] == {"connected": True, "protocol": 5}
    affine = diag["models"]["affine"]
    assert affine["state"] == "ready" and affine["model"]["inputs"][0]["name"] == "x"
    assert diag["models"]["broken"]["state"] == "failed"
    assert diag["models"]["broken"]["error"]["code"] == "model_load_failed"
    assert "doctor" in diag and diag["uptime_s"] > 0
    unknown = command(client, "format_disk", "c-3")
    assert unknown["error"]["code"] == "bad_request" and "ping" in unknown["error"]["message"]


# --- fuzz -------------------------------------------------------------------------------------

MODELS = ["affine", "two", "q", "colors", "nan", "broken", "nope"]
CONTENT_TYPES = [
    None,
    "application/json",
    "application/x-npy",
    "image/png",
    "image/jpeg",
    "application/x-edge-tensors",
    "text/plain",
    "",
]
MAGICS = [b"", b"\x93NUMPY", b"ETNS", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"{", b"[", b"\x00"]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
tensor_specs = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["x", "a", "b", "", 3]),
        "shape": st.lists(st.integers(-2, 5), max_size=4) | json_values,
        "datatype": st.sampled_from(["FP32", "INT8", "FP8", "BOOL", "UINT8", 1]),
        "data": st.lists(st.floats() | st.integers(-300, 300), max_size=12) | json_values,
    },
)
documents = st.fixed_dictionaries(
    {},
    optional={
        "id": st.text(max_size=10) | st.integers(),
        "reply_to": st.sampled_from(["", "a/+/b", "$SYS/x", f"edge/{DEVICE}/status"]) | json_values,
        "inputs": st.lists(tensor_specs, max_size=3) | json_values,
        "parameters": st.dictionaries(
            st.sampled_from(["deadline_ms", "binary_outputs", "raw_outputs", "quantized"]),
            json_values,
        )
        | json_values,
    },
)
payloads = (
    st.builds(lambda d: json.dumps(d).encode(), documents)
    | st.builds(lambda m, b: m + b, st.sampled_from(MAGICS), st.binary(max_size=200))
    | st.builds(
        lambda d, b: b"ETNS" + len(d).to_bytes(4, "big") + d + b,
        st.builds(lambda d: json.dumps(d).encode(), documents),
        st.binary(max_size=64),
    )
)


def test_fuzzed_requests_are_all_answered_and_the_daemon_stays_up(
    client: MqttClient, daemon: AgentProcess
) -> None:
    counts = {"sent": 0, "answered": 0}

    @settings(
        max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(model=st.sampled_from(MODELS), payload=payloads, ctype=st.sampled_from(CONTENT_TYPES))
    def one(model: str, payload: bytes, ctype: str | None) -> None:
        counts["sent"] += 1
        reply = client.request(model, payload, device=DEVICE, content_type=ctype, timeout=5)
        decoded = reply.decoded()  # a protocol reply: a response or an error
        assert decoded is not None
        counts["answered"] += 1

    t0 = time.monotonic()
    one()
    print(
        f"\nfuzz: {counts['answered']}/{counts['sent']} requests answered "
        f"in {time.monotonic() - t0:.1f} s"
    )
    assert counts["answered"] == counts["sent"] >= 100
    assert daemon.alive
    ok = client.request(
        "affine", encode_request([(None, np.ones((1, 3), np.float32))]), device=DEVICE
    ).response()
    np.testing.assert_array_equal(ok.outputs[0].array, np.ones((1, 3)) @ W + B)
