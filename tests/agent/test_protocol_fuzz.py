"""Fuzzing the protocol decoders: whatever arrives, they answer with a RequestError or a value."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.errors import BadRequest, PayloadTooLarge, RequestError
from agent.protocol import (
    DATATYPES,
    CommandReply,
    DesiredHint,
    InferRequest,
    InferResponse,
    StatusDocument,
    TelemetryDocument,
    TopicKind,
    UpdateEvent,
    cmd_reply_topic,
    cmd_topic,
    decode_document,
    decode_request,
    decode_response,
    default_reply_topic,
    desired_topic,
    encode_request,
    encode_response,
    infer_topic,
    parse_topic,
    status_topic,
    telemetry_topic,
    update_topic,
)
from agent.protocol import Timing as _Timing

#: Raise for a deeper run: PROTOCOL_FUZZ_EXAMPLES=20000 pytest tests/agent/test_protocol_fuzz.py
FUZZ = settings(
    max_examples=int(os.environ.get("PROTOCOL_FUZZ_EXAMPLES", "250")),
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
CONTENT_TYPES = st.sampled_from(
    [None, "", "application/json", "application/x-npy", "image/png",
     "application/x-edge-tensors", "application/json; charset=utf-8", "text/x-unknown"]
)  # fmt: skip
DATATYPE_NAMES = sorted(DATATYPES)


def decode_or_refuse(payload: bytes, content_type: str | None = None) -> InferRequest | None:
    """Decode, allowing only the protocol's refusals; check what a success holds."""
    try:
        req = decode_request(payload, content_type=content_type, max_bytes=1 << 16)
    except (BadRequest, PayloadTooLarge) as exc:
        assert isinstance(exc, RequestError)
        assert exc.code in ("bad_request", "payload_too_large")
        assert exc.message and "\n" not in exc.message
        return None
    assert (req.image is None) != (not req.tensors)
    for t in req.tensors:
        assert isinstance(t.array, np.ndarray) and t.array.dtype in DATATYPES.values()
    return req


# --- arbitrary bytes -------------------------------------------------------------------

MAGICS = st.sampled_from([b"", b"ETNS", b"\x93NUMPY", b"\x93NUMPY\x01\x00", b"{", b"\x89PNG"])


@FUZZ
@given(prefix=MAGICS, body=st.binary(max_size=300), content_type=CONTENT_TYPES)
def test_arbitrary_bytes(prefix: bytes, body: bytes, content_type: str | None) -> None:
    decode_or_refuse(prefix + body, content_type)


# --- JSON-ish structures -----------------------------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from(["NaN", "Infinity", "-Infinity", "x", "", "app/r", "a/#"])
)
JSONISH = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5)
    ),
    max_leaves=25,
)


VALUES = {
    "BOOL": st.booleans(),
    "FP": st.floats(allow_nan=True, allow_infinity=True)
    | st.integers(-(2**40), 2**40)
    | st.sampled_from(["NaN", "Infinity", "-Infinity"]),
    "INT": st.integers(-(2**64), 2**64) | st.integers(-300, 300),
}


@st.composite
def request_like(draw: st.DrawFn) -> dict[str, Any]:
    """Requests that are often valid, each piece sometimes replaced by junk."""

    def junk_or(strategy: st.SearchStrategy[Any]) -> Any:
        return draw(JSONISH) if draw(st.integers(0, 9)) == 0 else draw(strategy)

    datatype = junk_or(st.sampled_from([*DATATYPE_NAMES, "FP8"]))
    shape = junk_or(st.lists(st.integers(min_value=-1, max_value=3), max_size=3))
    valid_shape = isinstance(shape, list) and all(type(d) is int and d >= 0 for d in shape)
    size = math.prod(shape) if valid_shape else 3
    family = "BOOL" if datatype == "BOOL" else "FP" if str(datatype).startswith("FP") else "INT"
    count = min(size, 64) + draw(st.sampled_from([0, 0, 0, 0, 1, -1]))
    spec: dict[str, Any] = {
        "shape": shape,
        "datatype": datatype,
        "data": junk_or(st.lists(VALUES[family], min_size=max(0, count), max_size=max(0, count))),
    }
    if draw(st.booleans()):
        spec["name"] = junk_or(st.sampled_from(["x", "y"]))
    doc: dict[str, Any] = {
        "inputs": draw(st.sampled_from([[spec], [spec], [spec, spec], spec, []]))
    }
    if draw(st.booleans()):
        doc["id"] = junk_or(st.text(max_size=5))
    if draw(st.booleans()):
        doc["reply_to"] = junk_or(st.sampled_from(["app/r", "a/#", "", "$SYS/x", "a//b"]))
    if draw(st.booleans()):
        keys = draw(st.sets(st.sampled_from(["deadline_ms", "binary_outputs", "quantized", "k"])))
        doc["parameters"] = junk_or(st.fixed_dictionaries({k: SCALARS for k in keys}))
    return doc


@FUZZ
@given(doc=request_like() | JSONISH)
def test_json_structures(doc: Any) -> None:
    payload = json.dumps(doc).encode()  # NaN/Infinity literals included, as Python writes them
    decode_or_refuse(payload)
    decode_or_refuse(payload, "application/json")


@FUZZ
@given(doc=request_like(), body=st.binary(max_size=64))
def test_etns_with_arbitrary_headers(doc: dict[str, Any], body: bytes) -> None:
    head = json.dumps(doc).encode()
    decode_or_refuse(b"ETNS" + len(head).to_bytes(4, "big") + head + body)


# --- mutated valid binary payloads -------------------------------------------------------

ARRAYS = st.sampled_from(DATATYPE_NAMES).flatmap(
    lambda dt: st.lists(st.integers(0, 3), min_size=0, max_size=3).map(
        lambda shape: (np.arange(int(np.prod(shape)) if shape else 1) % 2).astype(DATATYPES[dt])
        .reshape(shape)
    )
)  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, payload: bytes) -> bytes:
    data = bytearray(payload)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "flip_tail", "cut", "insert", "delete"]))
        pos = draw(st.integers(0, max(0, len(data) - 1)))
        if op == "flip_tail":  # in the tensor bytes, where most payloads stay valid
            pos = max(0, len(data) - 1 - draw(st.integers(0, 7)))
            op = "flip"
        if op == "flip" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "cut":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=4))
        elif data:
            del data[pos]
    return bytes(data)


def npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


@FUZZ
@given(data=st.data(), arrays=st.lists(ARRAYS, min_size=1, max_size=3))
def test_mutated_etns(data: st.DataObject, arrays: list[np.ndarray]) -> None:
    named = [(f"in{i}", a) for i, a in enumerate(arrays)]
    payload = encode_request(named, request_id="r", binary=True)
    decode_or_refuse(data.draw(mutated(payload)))


@FUZZ
@given(data=st.data(), arr=ARRAYS)
def test_mutated_npy(data: st.DataObject, arr: np.ndarray) -> None:
    decode_or_refuse(data.draw(mutated(npy(arr))))


# --- round trips -------------------------------------------------------------------------


@FUZZ
@given(arrays=st.lists(ARRAYS, min_size=1, max_size=3), binary=st.booleans())
def test_requests_round_trip(arrays: list[np.ndarray], binary: bool) -> None:
    named = [(f"in{i}", a) for i, a in enumerate(arrays)]
    req = decode_request(encode_request(named, request_id="q", binary=binary))
    assert req.id == "q"
    for t, (name, a) in zip(req.tensors, named, strict=True):
        assert t.name == name and t.array.dtype == a.dtype
        np.testing.assert_array_equal(t.array, a)


FLOATS32 = st.lists(st.floats(width=32, allow_nan=True), min_size=1, max_size=8)


@FUZZ
@given(values=FLOATS32, binary=st.booleans())
def test_float_responses_round_trip_exactly(values: list[float], binary: bool) -> None:
    arr = np.array(values, np.float32)
    payload = encode_response(
        request_id=None, model="m", model_version="1", outputs=[("y", arr)], result=None,
        provider="cpu", timing=_Timing(0, 0, 0), binary=binary,
    )  # fmt: skip
    resp = decode_response(payload)
    assert isinstance(resp, InferResponse)
    np.testing.assert_array_equal(resp.outputs[0].array, arr)


# --- client-side and fleet-side decoders ---------------------------------------------------


@FUZZ
@given(payload=(MAGICS.flatmap(lambda m: st.binary(max_size=200).map(lambda b: m + b))))
def test_decode_response_arbitrary_bytes(payload: bytes) -> None:
    with contextlib.suppress(BadRequest):
        decode_response(payload)


@FUZZ
@given(doc=JSONISH, cls=st.sampled_from([StatusDocument, TelemetryDocument, UpdateEvent,
                                         CommandReply, DesiredHint]))  # fmt: skip
def test_documents_arbitrary_json(doc: Any, cls: type[StatusDocument]) -> None:
    with contextlib.suppress(BadRequest):
        decode_document(cls, json.dumps(doc).encode())


BUILDERS = {
    TopicKind.STATUS: status_topic,
    TopicKind.TELEMETRY: telemetry_topic,
    TopicKind.DESIRED: desired_topic,
    TopicKind.UPDATE: update_topic,
    TopicKind.CMD: cmd_topic,
    TopicKind.CMD_REPLY: cmd_reply_topic,
}


@FUZZ
@given(
    topic=st.text(alphabet="edg/+#$ab.-_\0é", max_size=40)
    | st.text(max_size=40)
    | st.lists(st.sampled_from(["edge", "d", "", "+", "#", "infer", "m", "reply", "cmd", "status"]),
               max_size=5).map("/".join)
)  # fmt: skip
def test_parse_topic_arbitrary_text(topic: str) -> None:
    try:
        device, kind, model = parse_topic(topic)
    except BadRequest:
        return
    if kind is TopicKind.INFER:
        assert model is not None and infer_topic(device, model) == topic
    elif kind is TopicKind.INFER_REPLY:
        assert model is not None and default_reply_topic(device, model) == topic
    else:
        assert model is None and BUILDERS[kind](device) == topic
