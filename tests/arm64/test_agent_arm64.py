"""``edge-agent run`` as an aarch64 process under qemu, driven over a real Mosquitto.

One emulated agent serves the whole session (``emulated_agent`` in conftest.py): its retained
status, its telemetry, the ``diagnostics`` command, and inference on ONNX and TFLite models,
with outputs checked against exact references or against a native x86 run of the same model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
from ai_edge_litert.interpreter import Interpreter

import agent
from agent.protocol import (
    RequestParameters,
    StatusDocument,
    TelemetryDocument,
    decode_document,
    encode_request,
    format_timestamp,
    utc_now,
)
from tests import modelgen
from tests.agent.agent_process import status_of
from tests.agent.daemon_client import MqttClient
from tests.agent.daemon_models import BGR, solid_image
from tests.arm64.emulated_agent import DEVICE, TELEMETRY_INTERVAL_S, EmulatedAgent

pytestmark = [pytest.mark.arm64, pytest.mark.broker, pytest.mark.slow]

Array = npt.NDArray[Any]
ETNS = "application/x-edge-tensors"
#: An emulated inference takes 50-130x its native time; these replies are still well under it.
REPLY_TIMEOUT_S = 60.0
W, B = modelgen.affine_weights(3, 2)
X = np.array([[1.0, 2.0, 3.0]], np.float32)
ONNX_PROVIDER = "CPUExecutionProvider"
TFLITE_PROVIDERS = ("XNNPACK", "CPU")


def infer(
    client: MqttClient, model: str, inputs: list[tuple[str | None, Array]], **params: Any
) -> dict[str, Array]:
    """One request (binary tensors, MQTT 5) to the emulated agent; the outputs by name."""
    parameters = RequestParameters(**params) if params else None
    payload = encode_request(inputs, parameters=parameters, binary=True)
    reply = client.request(
        model, payload, device=DEVICE, content_type=ETNS, timeout=REPLY_TIMEOUT_S
    ).response()
    assert reply.model == model
    assert all(t.name for t in reply.outputs), reply.outputs
    return {str(t.name): t.array for t in reply.outputs}


def command(client: MqttClient, name: str) -> dict[str, Any]:
    """Send an operator command and return its reply's ``result``."""
    topic = f"edge/{DEVICE}/cmd/reply"
    client.subscribe(topic)
    cid = f"arm64-{name}"
    doc = {"id": cid, "command": name, "ts": format_timestamp(utc_now())}
    client.publish(f"edge/{DEVICE}/cmd", json.dumps(doc).encode())
    reply = client.expect_where(topic, lambda m: m.json()["id"] == cid, REPLY_TIMEOUT_S).json()
    assert "error" not in reply, reply
    result: dict[str, Any] = reply["result"]
    return result


# --- the process, its status, its telemetry ----------------------------------------------------


def test_the_agent_is_an_emulated_aarch64_process(
    emulated_agent: EmulatedAgent, arm64_client: MqttClient
) -> None:
    # Seen from the host: the process is qemu's...
    exe = os.readlink(f"/proc/{emulated_agent.process.pid}/exe")
    assert Path(exe).name == "qemu-aarch64-static", exe
    # ...and from inside: an aarch64 machine running the root's Debian python, not the host's.
    doctor = command(arm64_client, "diagnostics")["doctor"]
    assert doctor["arch"] == "aarch64"
    assert doctor["detected"] == doctor["profile"] == "generic-arm64"
    assert doctor["python"].startswith("3.11.")
    probes = {f["format"]: f for f in doctor["formats"]}
    assert set(probes) == {"onnx", "tflite"}, doctor["formats"]


def test_status_is_retained_online_with_the_detected_profile(
    emulated_agent: EmulatedAgent, arm64_client: MqttClient
) -> None:
    doc = status_of(arm64_client, DEVICE)  # asserts it is retained
    decode_document(StatusDocument, json.dumps(doc).encode())
    assert (doc["state"], doc["profile"]) == ("online", "generic-arm64")
    assert doc["agent_version"] == agent.__version__
    models = doc["models"]
    assert set(models) == set(emulated_agent.models)
    assert {name: m["state"] for name, m in models.items()} == dict.fromkeys(models, "ready")
    for name in ("affine", "colors", "cls"):
        assert (models[name]["format"], models[name]["provider"]) == ("onnx", ONNX_PROVIDER)
    for name in ("fc", "q", "face"):
        assert models[name]["format"] == "tflite"
        assert models[name]["provider"] in TFLITE_PROVIDERS
    assert emulated_agent.first_status["profile"] == "generic-arm64"


def test_telemetry_arrives(emulated_agent: EmulatedAgent, arm64_client: MqttClient) -> None:
    topic = f"edge/{DEVICE}/telemetry"
    arm64_client.subscribe(topic, qos=0)
    timeout = 10 * TELEMETRY_INTERVAL_S + 20  # an emulated tick can be late
    first = arm64_client.expect(topic, timeout)
    second = arm64_client.expect(topic, timeout)
    for msg in (first, second):
        decode_document(TelemetryDocument, msg.payload)
    doc = second.json()
    assert doc["seq"] > first.json()["seq"]
    system = doc["system"]
    assert system["mem_total_bytes"] > 0 and system["agent_rss_bytes"] > 0
    assert set(doc["models"]) == set(emulated_agent.models)
    assert doc["models"]["affine"]["provider"] == ONNX_PROVIDER


# --- inference -----------------------------------------------------------------------------------


def test_onnx_model_answers_exactly(arm64_client: MqttClient) -> None:
    outputs = infer(arm64_client, "affine", [("x", X)])
    np.testing.assert_array_equal(outputs["y"], X @ W + B)


def test_tflite_models_answer_exactly(arm64_client: MqttClient) -> None:
    (y,) = infer(arm64_client, "fc", [(None, X)]).values()
    np.testing.assert_array_equal(y, X @ W + B)
    scale, zp = modelgen.QUANT_ADD_PARAMS["int8"]["x"]
    x = np.array([[0.5, 1.0, -1.5, 2.0]], np.float32)
    x_q = (np.round(x / scale) + zp).astype(np.int8)
    (y_q,) = infer(arm64_client, "q", [(None, x_q)], quantized=True).values()
    assert y_q.dtype == np.int8
    np.testing.assert_array_equal(y_q, modelgen.quantized_add_reference(x_q, "int8"))


@pytest.mark.parametrize("color", ["red", "blue"])
def test_image_bundle_decodes_and_classifies(arm64_client: MqttClient, color: str) -> None:
    image = solid_image(BGR[color], ".png")
    reply = arm64_client.request(
        "colors", image, device=DEVICE, content_type="image/png", timeout=REPLY_TIMEOUT_S
    ).response()
    assert reply.result is not None
    assert reply.result["classes"][0]["label"] == color


def native_onnx(path: Path, x: Array) -> dict[str, Array]:
    """The outputs of ``path`` for ``x`` by onnxruntime on this (x86) machine, by name."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    outputs = session.run(names, {session.get_inputs()[0].name: x})
    return {name: np.asarray(y) for name, y in zip(names, outputs, strict=True)}


def native_tflite(path: Path, x: Array) -> dict[str, Array]:
    """The outputs of ``path`` for ``x`` by LiteRT on this (x86) machine, by name."""
    interpreter = Interpreter(model_path=str(path))
    interpreter.allocate_tensors()
    interpreter.set_tensor(interpreter.get_input_details()[0]["index"], x)
    interpreter.invoke()
    return {d["name"]: interpreter.get_tensor(d["index"]) for d in interpreter.get_output_details()}


@pytest.mark.parametrize(
    ("model", "shape", "native"),
    [("cls", (1, 3, 48, 192), native_onnx), ("face", (1, 128, 128, 3), native_tflite)],
)
def test_real_model_matches_a_native_run(
    emulated_agent: EmulatedAgent,
    arm64_client: MqttClient,
    model: str,
    shape: tuple[int, ...],
    native: Any,
) -> None:
    x = np.random.default_rng(7).uniform(-1, 1, shape).astype(np.float32)
    emulated = infer(arm64_client, model, [(None, x)])
    expected = native(emulated_agent.models[model], x)
    assert sorted(emulated) == sorted(expected)
    for name, want in expected.items():
        got = emulated[name]
        assert got.shape == want.shape, name
        # ARM and x86 kernels sum in different orders: equal to float32 rounding, not bitwise.
        scale = float(np.abs(want).max()) or 1.0
        diff = float(np.abs(got - want).max())
        print(f"{model}.{name}: max |arm64 - x86| = {diff:.3g} (max |y| = {scale:.3g})")
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * scale, err_msg=name)
