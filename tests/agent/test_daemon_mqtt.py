"""``edge-agent run`` over a real Mosquitto, against PROTOCOL.md: payload kinds, replies, errors.

One agent process serves the whole module (its models: :func:`standard_models`). Clients are
plain paho: MQTT 5 (Response Topic, Correlation Data, Content Type) and MQTT 3.1.1
(``reply_to`` and ``id`` in the body, payload kinds sniffed).
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest

import agent
from agent.bundle import sha256_file
from agent.protocol import (
    InferResponse,
    RequestParameters,
    StatusDocument,
    decode_document,
    encode_request,
)
from tests import modelgen
from tests.agent.agent_process import TEST_PROFILE, AgentProcess, running_agent, status_of
from tests.agent.daemon_client import MqttClient
from tests.agent.daemon_models import BGR, color_probs, solid_image, standard_models
from tests.broker import Mosquitto

pytestmark = pytest.mark.broker

DEVICE = "daemon-mqtt"
MAX_PAYLOAD = 64 * 1024
W, B = modelgen.affine_weights(3, 2)
X = np.array([[1.0, 2.0, 3.0], [0.5, -1.0, 4.0]], np.float32)
JSON, NPY, ETNS = "application/json", "application/x-npy", "application/x-edge-tensors"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    return standard_models(tmp_path_factory.mktemp("daemon-mqtt-models"))


@pytest.fixture(scope="module")
def daemon(
    mosquitto: Mosquitto, models: list[dict[str, Any]], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AgentProcess]:
    folder = tmp_path_factory.mktemp("daemon-mqtt")
    limits = {"max_payload_bytes": MAX_PAYLOAD}
    with running_agent(folder, mosquitto.port, models, device=DEVICE, limits=limits) as proc:
        yield proc
        assert proc.alive
    proc.assert_clean_log()


@pytest.fixture(scope="module")
def v5(mosquitto: Mosquitto, daemon: AgentProcess) -> Iterator[MqttClient]:
    client = MqttClient(mosquitto.port)
    yield client
    client.close()


@pytest.fixture(scope="module")
def v311(mosquitto: Mosquitto, daemon: AgentProcess) -> Iterator[MqttClient]:
    client = MqttClient(mosquitto.port, v5=False)
    yield client
    client.close()


def npy(x: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, x)
    return buf.getvalue()


def check_affine(reply: InferResponse, x: np.ndarray = X) -> None:
    assert (reply.model, reply.provider) == ("affine", "CPUExecutionProvider")
    assert reply.model_version.startswith("sha256:") and reply.timing is not None
    assert [t.name for t in reply.outputs] == ["y"]
    np.testing.assert_array_equal(reply.outputs[0].array, x @ W + B)


# --- status ------------------------------------------------------------------------------


def test_retained_status_has_every_required_field(
    v5: MqttClient, models: list[dict[str, Any]]
) -> None:
    doc = status_of(v5, DEVICE)
    decode_document(StatusDocument, json.dumps(doc).encode())
    assert doc["state"] == "degraded"  # "broken" failed to load
    assert (doc["agent_version"], doc["profile"]) == (agent.__version__, TEST_PROFILE)
    assert {"ts", "started_at"} <= doc.keys()
    paths = {m["name"]: Path(m["path"]) for m in models}
    got = doc["models"]
    assert set(got) == set(paths)
    assert got["affine"] == {
        "version": "sha256:" + sha256_file(paths["affine"])[:12],
        "state": "ready",
        "format": "onnx",
        "provider": "CPUExecutionProvider",
    }
    assert (got["colors"]["version"], got["colors"]["state"]) == ("1.2.0", "ready")
    assert got["q"]["format"] == "tflite" and got["q"]["provider"] in ("XNNPACK", "CPU")
    assert got["broken"]["state"] == "failed"
    assert got["broken"]["error"]["code"] == "model_load_failed"


# --- payload kinds, MQTT 5 --------------------------------------------------------------------


@pytest.mark.parametrize("named", [True, False])
@pytest.mark.parametrize("qos", [0, 1])
def test_json_request_with_and_without_name(v5: MqttClient, named: bool, qos: int) -> None:
    payload = encode_request([("x" if named else None, X)], request_id="r-17")
    reply = v5.request("affine", payload, device=DEVICE, content_type=JSON, qos=qos)
    assert (reply.content_type, reply.qos) == (JSON, qos)
    response = reply.response()
    assert response.id == "r-17"
    check_affine(response)


@pytest.mark.parametrize("content_type", [NPY, None])
def test_npy_request(v5: MqttClient, content_type: str | None) -> None:
    reply = v5.request("affine", npy(X), device=DEVICE, content_type=content_type)
    check_affine(reply.response())


@pytest.mark.parametrize("content_type", [ETNS, None])
def test_etns_request_two_named_inputs(v5: MqttClient, content_type: str | None) -> None:
    a = np.arange(8, dtype=np.float32).reshape(2, 4)
    b = np.full((2, 4), 3.0, np.float32)
    payload = encode_request([("b", b), ("a", a)], request_id="bin-1", binary=True)
    reply = v5.request("two", payload, device=DEVICE, content_type=content_type).response()
    assert reply.id == "bin-1"
    outs = {t.name: t.array for t in reply.outputs}
    np.testing.assert_array_equal(outs["sum"], a + b)
    np.testing.assert_array_equal(outs["prod"], a * b)


@pytest.mark.parametrize(("ext", "content_type"), [(".png", "image/png"), (".jpg", "image/jpeg")])
@pytest.mark.parametrize("color", ["red", "green", "blue"])
def test_image_requests(v5: MqttClient, ext: str, content_type: str, color: str) -> None:
    image = solid_image(BGR[color], ext)
    for ct in (content_type, None):  # named by the Content Type, then sniffed
        reply = v5.request("colors", image, device=DEVICE, content_type=ct).response()
        assert (reply.model, reply.model_version) == ("colors", "1.2.0")
        assert reply.outputs == ()  # the result replaces the raw outputs...
        assert reply.result is not None
        top = reply.result["classes"]
        assert [c["label"] for c in top][:1] == [color] and len(top) == 2


def test_raw_outputs_with_a_result(v5: MqttClient) -> None:
    rgb = (200, 40, 10)
    image = np.broadcast_to(np.asarray(rgb, np.float32)[None, :, None, None] / 255, (1, 3, 8, 8))
    params = RequestParameters(raw_outputs=True)
    payload = encode_request([(None, np.ascontiguousarray(image))], parameters=params)
    reply = v5.request("colors", payload, device=DEVICE).response()
    assert reply.result is not None and reply.result["classes"][0]["label"] == "red"
    ((out,),) = [reply.outputs]  # ...unless raw_outputs asks for them
    assert out.name == "probs"
    np.testing.assert_allclose(out.array, color_probs(rgb), rtol=1e-5)
    plain = v5.request(
        "colors", encode_request([(None, np.ascontiguousarray(image))]), device=DEVICE
    )
    assert plain.response().outputs == ()


def test_binary_outputs_reply_is_etns(v5: MqttClient) -> None:
    params = RequestParameters(binary_outputs=True)
    for binary_request in (False, True):
        payload = encode_request(
            [(None, X)], request_id="b", parameters=params, binary=binary_request
        )
        reply = v5.request("affine", payload, device=DEVICE)
        assert reply.payload[:4] == b"ETNS" and reply.content_type == ETNS
        response = reply.response()
        assert response.id == "b"
        check_affine(response)


def test_quantized_int8_model(v5: MqttClient) -> None:
    scale, zp = modelgen.QUANT_ADD_PARAMS["int8"]["x"]
    x = np.array([[0.5, 1.0, -1.5, 2.0]], np.float32)
    floats = v5.request("q", encode_request([(None, x)]), device=DEVICE).response()
    (y,) = floats.outputs
    assert y.array.dtype == np.float32  # dequantized by the agent
    np.testing.assert_allclose(y.array, x + np.arange(1, 5), atol=0.25)
    x_q = (np.round(x / scale) + zp).astype(np.int8)
    params = RequestParameters(quantized=True)
    raw = v5.request("q", encode_request([(None, x_q)], parameters=params), device=DEVICE)
    (y_q,) = raw.response().outputs
    assert y_q.array.dtype == np.int8
    np.testing.assert_array_equal(y_q.array, modelgen.quantized_add_reference(x_q, "int8"))


# --- payload kinds, MQTT 3.1.1 ------------------------------------------------------------


def test_v311_json_reply_to_and_id(v311: MqttClient) -> None:
    topic = v311.new_reply_topic()
    payload = encode_request([(None, X)], request_id="old-1", reply_to=topic)
    reply = v311.request("affine", payload, device=DEVICE, reply_topic=topic)
    assert reply.topic == topic
    response = reply.response()
    assert response.id == "old-1"
    check_affine(response)


def test_v311_etns_reply_to_in_the_header(v311: MqttClient) -> None:
    topic = v311.new_reply_topic()
    params = RequestParameters(binary_outputs=True)
    payload = encode_request(
        [("x", X)], request_id="e", reply_to=topic, parameters=params, binary=True
    )
    response = v311.request("affine", payload, device=DEVICE, reply_topic=topic).response()
    assert response.id == "e"
    check_affine(response)


def test_v311_without_reply_to_answers_on_the_default_topic(v311: MqttClient) -> None:
    default = f"edge/{DEVICE}/infer/affine/reply"
    for payload in (encode_request([(None, X)], request_id="d"), npy(X)):
        reply = v311.request("affine", payload, device=DEVICE)
        assert reply.topic == default
        check_affine(reply.response())
    for ext in (".png", ".jpg"):
        image = v311.request("colors", solid_image(BGR["green"], ext), device=DEVICE)
        assert image.topic == f"edge/{DEVICE}/infer/colors/reply"
        assert image.response().result["classes"][0]["label"] == "green"  # type: ignore[index]


# --- errors -------------------------------------------------------------------------------

ONE = np.zeros((1, 3), np.float32)


class ErrorCase(NamedTuple):
    name: str
    model: str
    payload: bytes
    content_type: str | None
    code: str
    message: str  # a part of it


def _req(x: np.ndarray, name: str | None = None) -> bytes:
    return encode_request([(name, x)], request_id="e1")


_TWO_UNNAMED = (
    b'{"id":"e1","inputs":[{"shape":[1,4],"datatype":"FP32","data":[1,2,3,4]},'
    b'{"shape":[1,4],"datatype":"FP32","data":[1,2,3,4]}]}'
)
_FP8 = b'{"id":"e1","inputs":[{"shape":[1],"datatype":"FP8","data":[1]}]}'
ERROR_CASES = [
    ErrorCase("not json", "affine", b"{nope", None, "bad_request", "JSON"),
    ErrorCase("unknown type", "affine", b"{}", "text/plain", "bad_request", "content type"),
    ErrorCase("no inputs", "affine", b'{"id": "e1"}', JSON, "bad_request", "'inputs'"),
    ErrorCase("unknown datatype", "affine", _FP8, None, "bad_request", "datatype 'FP8'"),
    ErrorCase("unnamed inputs", "two", _TWO_UNNAMED, None, "bad_request", "'name' is required"),
    ErrorCase(
        "wrong shape",
        "affine",
        _req(np.zeros((1, 4), np.float32), "x"),
        None,
        "bad_input",
        "expected shape [?,3], got [1, 4]",
    ),
    ErrorCase("wrong name", "affine", _req(ONE, "z"), None, "bad_input", "unknown input 'z'"),
    ErrorCase(
        "wrong datatype",
        "affine",
        _req(ONE.astype(np.int32), "x"),
        None,
        "bad_input",
        "expected datatype FP32, got INT32",
    ),
    ErrorCase(
        "image, no preprocessing",
        "affine",
        solid_image(BGR["red"], ".png"),
        None,
        "bad_input",
        "does not take images",
    ),
    ErrorCase(
        "image does not decode",
        "colors",
        b"\x89PNG\r\n\x1a\n" + bytes(64),
        None,
        "bad_input",
        "does not decode",
    ),
    ErrorCase("unknown model", "nope", _req(ONE), None, "unknown_model", "no model 'nope'"),
    ErrorCase("failed model", "broken", _req(ONE), None, "model_not_ready", "'broken' is failed"),
    ErrorCase(
        "NaN output",
        "nan",
        _req(-np.ones((1, 4), np.float32)),
        None,
        "internal",
        "model 'nan' produced NaN or Inf in output 'y'",
    ),
]


@pytest.mark.parametrize("case", ERROR_CASES, ids=[c.name for c in ERROR_CASES])
def test_every_error_is_answered_with_its_code(
    v5: MqttClient, v311: MqttClient, case: ErrorCase
) -> None:
    reply = v5.request(case.model, case.payload, device=DEVICE, content_type=case.content_type)
    err = reply.error()
    assert err.code == case.code
    assert case.message in err.message
    assert "\n" not in err.message and "Traceback" not in err.message
    if b'"id"' in case.payload or case.payload[:4] == b"ETNS":
        assert err.id == "e1"
    if case.content_type is None:  # the same over MQTT 3.1.1 (answered on the default topic)
        old = v311.request(case.model, case.payload, device=DEVICE).error()
        assert (old.code, old.message) == (case.code, err.message)


def test_payload_too_large(v5: MqttClient, v311: MqttClient) -> None:
    big = np.zeros((1, MAX_PAYLOAD // 4 + 16), np.float32)
    topic = v311.new_reply_topic()
    body = encode_request([("x", big)], request_id="big", reply_to=topic, binary=True)
    assert len(body) > MAX_PAYLOAD
    err = v5.request("affine", body, device=DEVICE).error()
    assert err.code == "payload_too_large" and str(MAX_PAYLOAD) in err.message
    # MQTT 3.1.1: the body is not parsed for reply_to; the default topic gets the answer.
    reply = v311.request("affine", body, device=DEVICE)
    assert reply.topic == f"edge/{DEVICE}/infer/affine/reply"
    assert reply.error().code == "payload_too_large" and reply.error().id is None
    assert v311.nothing_on(topic, 0.2)


def test_requests_that_reach_no_model_are_answered(v5: MqttClient) -> None:
    # A model name outside the protocol's alphabet: the reply topic is known, so answer.
    err = v5.request("bad name!", encode_request([(None, ONE)]), device=DEVICE).error()
    assert err.code == "unknown_model"


@pytest.mark.parametrize(
    "suffix", ["status", "telemetry", "cmd", "cmd/reply", "update", "infer/affine"]
)
def test_a_reply_to_may_not_pose_as_a_device_topic(v311: MqttClient, suffix: str) -> None:
    target = f"edge/{DEVICE}/{suffix}"
    v311.subscribe(target)
    payload = encode_request([(None, X)], request_id="spoof", reply_to=target)
    reply = v311.request("affine", payload, device=DEVICE)  # refused, on the default topic
    assert reply.topic == f"edge/{DEVICE}/infer/affine/reply"
    err = reply.error()
    assert (err.code, err.id) == ("bad_request", "spoof")
    assert "device's own topics" in err.message
    v311.nothing_on(target, 0.2)
    posed = [m for m in v311.drain(target) if b"spoof" in m.payload and m.payload != payload]
    assert posed == []
