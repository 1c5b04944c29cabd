"""The device protocol module against PROTOCOL.md: topics, request kinds, replies, documents."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from agent.errors import (
    BadInput,
    BadRequest,
    DeadlineExceeded,
    InferenceError,
    Overloaded,
    PayloadTooLarge,
    RequestError,
    UnknownModel,
)
from agent.protocol import (
    Command,
    CommandReply,
    DesiredHint,
    ErrorInfo,
    ErrorReply,
    InferResponse,
    LatencyMs,
    MalformedRequest,
    ModelStatus,
    ModelTelemetry,
    PayloadKind,
    RequestParameters,
    StatusDocument,
    SystemTelemetry,
    TelemetryDocument,
    Timing,
    TopicKind,
    UpdateEvent,
    check_publish_topic,
    cmd_reply_topic,
    cmd_topic,
    datatype_of,
    deadline_passed,
    decode_document,
    decode_request,
    decode_response,
    default_reply_topic,
    desired_topic,
    dtype_of,
    encode_error,
    encode_exception,
    encode_request,
    encode_response,
    fleet_filter,
    format_timestamp,
    infer_filter,
    infer_topic,
    is_control_topic,
    parse_topic,
    payload_kind,
    remaining_ms,
    reply_topic_for,
    request_deadline,
    status_topic,
    telemetry_topic,
    update_topic,
)

ALL_DATATYPES = [
    "BOOL",
    "UINT8",
    "INT8",
    "UINT16",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
]
INT_DATATYPES = ["UINT8", "INT8", "UINT16", "INT16", "INT32", "INT64"]


def jbytes(doc: Any) -> bytes:
    return json.dumps(doc).encode()


def request_doc(**inp: Any) -> dict[str, Any]:
    spec = {"name": "x", "shape": [3], "datatype": "FP32", "data": [1, 2, 3]} | inp
    return {"id": "r-1", "reply_to": "app/replies", "inputs": [spec]}


def sample(datatype: str, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    dtype = dtype_of(datatype)
    n = int(np.prod(shape))
    if datatype == "BOOL":
        return np.asarray(np.arange(n) % 3 == 0).reshape(shape)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        base = [int(info.min), int(info.max), 0, 1, int(info.max) // 3, int(info.min) // 3]
        return np.array([base[i % len(base)] for i in range(n)], dtype).reshape(shape)
    return (np.arange(n, dtype=np.float64) / 7 - 0.3).astype(dtype).reshape(shape)


def npy_bytes(arr: np.ndarray, **kw: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, **kw)
    return buf.getvalue()


def etns(header: dict[str, Any], body: bytes) -> bytes:
    head = json.dumps(header).encode()
    return b"ETNS" + len(head).to_bytes(4, "big") + head + body


# --- topics ----------------------------------------------------------------------------


def test_topic_builders_follow_the_table() -> None:
    assert infer_topic("cam-01", "face") == "edge/cam-01/infer/face"
    assert default_reply_topic("cam-01", "face") == "edge/cam-01/infer/face/reply"
    assert status_topic("cam-01") == "edge/cam-01/status"
    assert telemetry_topic("cam-01") == "edge/cam-01/telemetry"
    assert desired_topic("cam-01") == "edge/cam-01/desired"
    assert update_topic("cam-01") == "edge/cam-01/update"
    assert cmd_topic("cam-01") == "edge/cam-01/cmd"
    assert cmd_reply_topic("cam-01", prefix="plant/3") == "plant/3/cam-01/cmd/reply"
    assert infer_filter("d.1") == "edge/d.1/infer/+"
    assert fleet_filter(TopicKind.UPDATE, "fleet") == "fleet/+/update"
    assert fleet_filter(TopicKind.CMD_REPLY) == "edge/+/cmd/reply"
    with pytest.raises(BadRequest):
        fleet_filter(TopicKind.INFER)


@pytest.mark.parametrize("bad", ["", "a/b", "+", "#", "a b", "é", "x" * 65, "dev\0"])
def test_builders_refuse_invalid_ids(bad: str) -> None:
    with pytest.raises(BadRequest):
        status_topic(bad)
    with pytest.raises(BadRequest):
        infer_topic("dev", bad)


@pytest.mark.parametrize("prefix", ["", "a//b", "/edge", "edge/", "ed+ge", "$SYS", "e#"])
def test_builders_refuse_invalid_prefixes(prefix: str) -> None:
    with pytest.raises(BadRequest):
        status_topic("dev", prefix)


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("edge/cam-01/status", ("cam-01", TopicKind.STATUS, None)),
        ("edge/cam-01/telemetry", ("cam-01", TopicKind.TELEMETRY, None)),
        ("edge/cam-01/desired", ("cam-01", TopicKind.DESIRED, None)),
        ("edge/cam-01/update", ("cam-01", TopicKind.UPDATE, None)),
        ("edge/cam-01/cmd", ("cam-01", TopicKind.CMD, None)),
        ("edge/cam-01/cmd/reply", ("cam-01", TopicKind.CMD_REPLY, None)),
        ("edge/A_b.9/infer/face.v2", ("A_b.9", TopicKind.INFER, "face.v2")),
        ("edge/d/infer/face/reply", ("d", TopicKind.INFER_REPLY, "face")),
        ("edge/" + "d" * 64 + "/status", ("d" * 64, TopicKind.STATUS, None)),
    ],
)
def test_parse_topic(topic: str, expected: tuple[str, TopicKind, str | None]) -> None:
    assert parse_topic(topic) == expected
    device, kind, model = parse_topic(topic)
    assert (device, kind, model) == expected


def test_parse_topic_with_a_multi_level_prefix() -> None:
    assert parse_topic("plant/3/dev/cmd/reply", "plant/3") == ("dev", TopicKind.CMD_REPLY, None)
    with pytest.raises(BadRequest):
        parse_topic("plant/3/dev/cmd/reply", "plant")


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "edge",
        "edge/",
        "edge//status",
        "edge/+/status",
        "edge/#",
        "edge/dev/#",
        "edge/dev/+",
        "edge/dev/status/",
        "edge/dev/status/x",
        "edge/dev/infer",
        "edge/dev/infer/",
        "edge/dev/infer/+",
        "edge/dev/infer/#",
        "edge/dev/infer/m/reply/x",
        "edge/dev/infer/m/other",
        "edge/dev/cmd/replies",
        "edge/dev/unknown",
        "edgeX/dev/status",
        "other/dev/status",
        "/edge/dev/status",
        "edge/" + "d" * 65 + "/status",
        "edge/dev/infer/" + "m" * 65,
        "edge/dé/status",
        "edge/dev\0/status",
    ],
)
def test_parse_topic_refuses_malformed(topic: str) -> None:
    with pytest.raises(BadRequest):
        parse_topic(topic)


def test_publish_topic_check() -> None:
    assert check_publish_topic("app/replies") == "app/replies"
    assert check_publish_topic("a//b/é") == "a//b/é"  # empty levels and UTF-8 are legal MQTT
    for bad in ["", "a/+", "a/#", "#", "$SYS/x", "a\0b", "x" * 65536, "a\ud800"]:
        with pytest.raises(BadRequest):
            check_publish_topic(bad)


def test_control_topics_are_not_reply_targets() -> None:
    assert is_control_topic("edge/dev/status", "dev")
    assert is_control_topic("edge/dev/cmd/reply", "dev")
    assert is_control_topic("edge/dev/infer/face", "dev")  # would loop into its own requests
    assert not is_control_topic("edge/dev/infer/face/reply", "dev")
    assert not is_control_topic("edge/other/status", "dev")
    assert not is_control_topic("app/replies", "dev")


# --- request kinds ---------------------------------------------------------------------


def test_json_request_spec_example() -> None:
    payload = (
        b'{"id": "r-17", "reply_to": "app/replies",'
        b' "inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [0.1, 0.2, 0.3]}],'
        b' "parameters": {"deadline_ms": 500, "binary_outputs": false}}'
    )
    req = decode_request(payload)
    assert req.kind is PayloadKind.JSON
    assert (req.id, req.reply_to) == ("r-17", "app/replies")
    assert req.parameters == RequestParameters(deadline_ms=500.0)
    assert req.image is None
    [t] = req.tensors
    assert t.name == "x" and t.array.dtype == np.float32 and t.array.shape == (1, 3)
    np.testing.assert_array_equal(t.array, np.array([[0.1, 0.2, 0.3]], np.float32))


def test_json_request_without_name_ids_or_parameters() -> None:
    req = decode_request(b'{"inputs": [{"shape": [2], "datatype": "INT64", "data": [-5, 7]}]}')
    assert (req.id, req.reply_to, req.parameters) == (None, None, RequestParameters())
    assert req.tensors[0].name is None
    np.testing.assert_array_equal(req.tensors[0].array, np.array([-5, 7], np.int64))


def test_json_unknown_fields_and_parameters_are_ignored_nulls_are_absent() -> None:
    doc = request_doc() | {"future": {"x": 1}, "id": None, "reply_to": None}
    doc["parameters"] = {"quantized": True, "raw_outputs": True, "beam": 4, "deadline_ms": None}
    doc["inputs"][0]["layout"] = "NCHW"
    req = decode_request(jbytes(doc))
    assert (req.id, req.reply_to) == (None, None)
    assert req.parameters == RequestParameters(quantized=True, raw_outputs=True)


@pytest.mark.parametrize("datatype", ALL_DATATYPES)
def test_json_every_datatype_round_trips_its_extremes(datatype: str) -> None:
    arr = sample(datatype)
    req = decode_request(encode_request([("x", arr)]))
    out = req.tensors[0].array
    assert out.dtype == dtype_of(datatype) and out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)
    assert datatype_of(out.dtype) == datatype


def test_json_nested_data_is_accepted_row_major() -> None:
    doc = request_doc(shape=[2, 2], data=[[1, 2], [3, 4]])
    np.testing.assert_array_equal(decode_request(jbytes(doc)).tensors[0].array, [[1, 2], [3, 4]])
    doc = request_doc(shape=[4], data=[[1, 2], [3, 4]])  # any rectangular nesting, same count
    np.testing.assert_array_equal(decode_request(jbytes(doc)).tensors[0].array, [1, 2, 3, 4])


def test_json_scalar_and_empty_tensors() -> None:
    req = decode_request(jbytes(request_doc(shape=[], data=[2.5])))
    assert req.tensors[0].array.shape == () and float(req.tensors[0].array) == 2.5
    req = decode_request(jbytes(request_doc(shape=[0, 3], datatype="INT8", data=[])))
    assert req.tensors[0].array.shape == (0, 3) and req.tensors[0].array.dtype == np.int8


def test_json_ints_are_accepted_for_float_datatypes() -> None:
    arr = decode_request(jbytes(request_doc(datatype="FP16", data=[1, -2, 3]))).tensors[0].array
    assert arr.dtype == np.float16
    np.testing.assert_array_equal(arr, [1, -2, 3])


def test_json_non_finite_floats_in_both_spellings() -> None:
    for data in (["NaN", "Infinity", "-Infinity"], [float("nan"), float("inf"), float("-inf")]):
        body = json.dumps(request_doc(datatype="FP64", data=data)).encode()
        arr = decode_request(body).tensors[0].array
        assert np.isnan(arr[0]) and arr[1] == np.inf and arr[2] == -np.inf


def test_npy_kinds() -> None:
    arr = sample("FP32", (1, 4, 5))
    for payload in (npy_bytes(arr), npy_bytes(np.asfortranarray(arr))):
        req = decode_request(payload)
        assert req.kind is PayloadKind.NPY and req.tensors[0].name is None
        np.testing.assert_array_equal(req.tensors[0].array, arr)
        assert req.tensors[0].array.flags.c_contiguous
    big = decode_request(npy_bytes(arr.astype(">f4"))).tensors[0].array
    assert big.dtype == np.float32 and big.dtype.isnative
    np.testing.assert_array_equal(big, arr)
    for datatype in ALL_DATATYPES:
        a = sample(datatype)
        np.testing.assert_array_equal(decode_request(npy_bytes(a)).tensors[0].array, a)


def test_npy_is_a_read_only_zero_copy_view() -> None:
    payload = npy_bytes(np.arange(16, dtype=np.float32))
    out = decode_request(payload).tensors[0].array
    assert not out.flags.writeable and not out.flags.owndata
    assert np.shares_memory(out, np.frombuffer(payload, np.uint8))


def test_npy_version_2_header() -> None:
    arr = np.arange(6, dtype=np.int16).reshape(2, 3)
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, version=(2, 0))
    np.testing.assert_array_equal(decode_request(buf.getvalue()).tensors[0].array, arr)


@pytest.mark.parametrize(
    "payload",
    [
        npy_bytes(np.array([{"a": 1}], dtype=object), allow_pickle=True),
        npy_bytes(np.array(["abc"])),
        npy_bytes(np.array([1 + 2j])),
        npy_bytes(np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")])),
        npy_bytes(np.zeros(2, dtype=np.uint32)),
        npy_bytes(np.arange(4, dtype=np.float32)) + b"\0",
        npy_bytes(np.arange(4, dtype=np.float32))[:-1],
        npy_bytes(np.arange(4, dtype=np.float32))[:20],
        b"\x93NUMPY\x09\x00",
        npy_bytes(np.array([True, False]))[:-1] + b"\x02",
    ],
)
def test_npy_refused(payload: bytes) -> None:
    with pytest.raises(MalformedRequest):
        decode_request(payload)


def test_images_are_sniffed_and_passed_through() -> None:
    cv2 = pytest.importorskip("cv2")
    img = (np.arange(8 * 8 * 3) % 255).astype(np.uint8).reshape(8, 8, 3)
    for ext in (".png", ".jpg"):
        ok, enc = cv2.imencode(ext, img)
        assert ok
        payload = enc.tobytes()
        req = decode_request(payload)
        assert req.kind is PayloadKind.IMAGE and req.image == payload and req.tensors == ()
        ctype = "image/png" if ext == ".png" else "image/jpeg"
        assert decode_request(payload, content_type=ctype).image == payload


def test_image_magic_alone_is_enough() -> None:
    assert decode_request(b"\xff\xd8\xff\xe0rest").kind is PayloadKind.IMAGE
    assert decode_request(b"\x89PNG\r\n\x1a\nrest").kind is PayloadKind.IMAGE
    assert payload_kind(b"\x89PNG\r\n", None) is PayloadKind.JSON  # no full magic: JSON...
    with pytest.raises(MalformedRequest):  # ...which then fails
        decode_request(b"\x89PNG\r\n")


def test_etns_multi_input_round_trip_zero_copy() -> None:
    a, b, c = sample("FP32", (1, 3)), sample("UINT8", (5,)), sample("BOOL", (2, 2))
    params = RequestParameters(deadline_ms=20, binary_outputs=True)
    payload = encode_request(
        [("a", a), ("b", b), ("c", c)],
        request_id="r",
        reply_to="x/y",
        parameters=params,
        binary=True,
    )
    assert payload[:4] == b"ETNS" and (8 + int.from_bytes(payload[4:8], "big")) % 8 == 0
    req = decode_request(payload)
    assert req.kind is PayloadKind.TENSORS
    assert (req.id, req.reply_to, req.parameters) == ("r", "x/y", params)
    assert [t.name for t in req.tensors] == ["a", "b", "c"]
    for t, ref in zip(req.tensors, (a, b, c), strict=True):
        assert t.array.dtype == ref.dtype
        np.testing.assert_array_equal(t.array, ref)
        assert not t.array.flags.writeable
    assert np.shares_memory(req.tensors[0].array, np.frombuffer(payload, np.uint8))


def test_etns_hand_built_unaligned_is_copied_and_correct() -> None:
    body = np.array([7], "<u1").tobytes() + np.array([1.5, -2.0], "<f8").tobytes()
    header = {
        "inputs": [
            {"name": "a", "shape": [1], "datatype": "UINT8"},
            {"name": "b", "shape": [2], "datatype": "FP64", "data": "ignored"},
        ]
    }
    req = decode_request(etns(header, body))
    assert req.tensors[1].array.flags.aligned
    np.testing.assert_array_equal(req.tensors[1].array, [1.5, -2.0])


@pytest.mark.parametrize(
    "payload",
    [
        b"ETNS",
        b"ETNS\x00\x00\x00",
        b"ETNS\x00\x00\x01\x00{}",
        b"ETNS\x00\x00\x00\x02[]",
        b"ETNS\x00\x00\x00\x02{x",
        etns({"inputs": [{"name": "a", "shape": [2], "datatype": "FP32"}]}, b"\0" * 7),
        etns({"inputs": [{"name": "a", "shape": [2], "datatype": "FP32"}]}, b"\0" * 9),
        etns({"inputs": [{"name": "a", "shape": [2], "datatype": "FP8"}]}, b"\0" * 2),
        etns({"inputs": [{"name": "a", "shape": [2], "datatype": "BOOL"}]}, b"\x01\x02"),
        etns({"inputs": []}, b""),
    ],
)
def test_etns_refused(payload: bytes) -> None:
    with pytest.raises(MalformedRequest):
        decode_request(payload)


# --- content types -----------------------------------------------------------------------


def test_content_type_wins_over_sniffing() -> None:
    npy = npy_bytes(np.arange(3, dtype=np.float32))
    json_body = jbytes(request_doc())
    assert decode_request(npy, content_type="application/x-npy").kind is PayloadKind.NPY
    with pytest.raises(MalformedRequest):
        decode_request(npy, content_type="application/json")
    with pytest.raises(MalformedRequest):
        decode_request(json_body, content_type="application/x-npy")
    with pytest.raises(MalformedRequest):
        decode_request(json_body, content_type="application/x-edge-tensors")
    assert decode_request(json_body, content_type="image/png").kind is PayloadKind.IMAGE
    for ctype in ("application/json; charset=utf-8", "Application/JSON", " application/json "):
        assert decode_request(json_body, content_type=ctype).kind is PayloadKind.JSON
    assert decode_request(npy, content_type="").kind is PayloadKind.NPY  # empty: sniff


@pytest.mark.parametrize("ctype", ["text/plain", "application/octet-stream", "image/jpg", ";"])
def test_unknown_content_type_is_bad_request(ctype: str) -> None:
    with pytest.raises(MalformedRequest, match="content type"):
        decode_request(jbytes(request_doc()), content_type=ctype)


# --- bad requests ------------------------------------------------------------------------

BAD_JSON: list[tuple[Any, str]] = [
    ("not json", "not valid JSON"),
    ([1, 2], "JSON object"),
    ("\xff\xfe", "not valid JSON"),
    ({"id": "a"}, "'inputs'"),
    ({"inputs": []}, "'inputs'"),
    ({"inputs": {"x": 1}}, "'inputs'"),
    ({"inputs": [1]}, "must be an object"),
    (request_doc(shape=None) | {}, "'shape'"),
    (request_doc(shape="3"), "'shape'"),
    (request_doc(shape=[-1]), "'shape'"),
    (request_doc(shape=[True]), "'shape'"),
    (request_doc(shape=[3.0]), "'shape'"),
    (request_doc(shape=[1] * 33), "'shape'"),
    (request_doc(datatype="FP8"), "unknown datatype"),
    (request_doc(datatype="fp32"), "unknown datatype"),
    (request_doc(datatype=5), "unknown datatype"),
    (request_doc(datatype=None), "unknown datatype"),
    (request_doc(data=[1, 2]), "needs 3 values"),
    (request_doc(data=[[1, 2], [3]]), "rectangular"),
    (request_doc(data=None), "must be a list"),
    (request_doc(data={"a": 1}), "must be a list"),
    (request_doc(shape=[], data=5), "must be a list"),
    ({"inputs": [{"shape": [1], "datatype": "FP32"}]}, "must be a list"),
    (request_doc(data=["1", "2", "3"]), "not NaN"),
    (request_doc(data=[1, None, 3]), "must be numbers"),
    (request_doc(data=[True, False, True]), "must be numbers"),
    (request_doc(datatype="FP16", data=[1, 2, 70000]), "out of range"),
    (request_doc(datatype="FP32", data=[1, 2, 1e300]), "out of range"),
    (request_doc(datatype="INT32", data=[1, 2, 3.5]), "integers"),
    (request_doc(datatype="INT32", data=[1, 2, 3.0]), "integers"),
    (request_doc(datatype="INT8", data=[1, 2, 128]), r"integers in \[-128, 127\]"),
    (request_doc(datatype="UINT8", data=[1, -1, 3]), r"integers in \[0, 255\]"),
    (request_doc(datatype="INT64", data=[1, 2, 2**63]), "integers"),
    (request_doc(datatype="INT64", data=[2**63, 2**63, 2**63]), "integers"),
    (request_doc(datatype="INT64", data=[1, 2, 2**70]), "integers"),
    (request_doc(datatype="INT64", data=[-1, 2, 2**64]), "integers"),
    (request_doc(datatype="BOOL", data=[1, 0, 1]), "true/false"),
    (request_doc(datatype="UINT8", data=[True, False, True]), "integers"),
    (request_doc(name=""), "'name'"),
    (request_doc(name=7), "'name'"),
    ({"inputs": [{"shape": [1], "datatype": "FP32", "data": [1]}] * 2}, "required when"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1]}] * 2}, "unique"),
    (request_doc() | {"id": 17}, "'id'"),
    (request_doc() | {"reply_to": "app/#"}, "reply topic"),
    (request_doc() | {"reply_to": ""}, "reply topic"),
    (request_doc() | {"reply_to": ["a"]}, "reply topic"),
    (request_doc() | {"parameters": [1]}, "'parameters'"),
    (request_doc() | {"parameters": {"deadline_ms": -1}}, "deadline_ms"),
    (request_doc() | {"parameters": {"deadline_ms": "5"}}, "deadline_ms"),
    (request_doc() | {"parameters": {"deadline_ms": True}}, "deadline_ms"),
    (request_doc() | {"parameters": {"binary_outputs": "yes"}}, "binary_outputs"),
    (request_doc() | {"parameters": {"quantized": 1}}, "quantized"),
]


@pytest.mark.parametrize(("doc", "fragment"), BAD_JSON)
def test_bad_json_requests(doc: Any, fragment: str) -> None:
    payload = doc.encode("latin-1") if isinstance(doc, str) else jbytes(doc)
    with pytest.raises(MalformedRequest, match=fragment) as info:
        decode_request(payload)
    assert info.value.code == "bad_request"
    assert "\n" not in info.value.message


@pytest.mark.parametrize("datatype", INT_DATATYPES)
def test_every_integer_range_is_enforced(datatype: str) -> None:
    info = np.iinfo(dtype_of(datatype))
    ok = request_doc(datatype=datatype, data=[int(info.min), 0, int(info.max)])
    np.testing.assert_array_equal(
        decode_request(jbytes(ok)).tensors[0].array, ok["inputs"][0]["data"]
    )
    for value in (int(info.min) - 1, int(info.max) + 1):
        with pytest.raises(MalformedRequest, match="must be integers in"):
            decode_request(jbytes(request_doc(datatype=datatype, data=[0, value, 0])))


def test_deeply_nested_json_is_a_bad_request() -> None:
    with pytest.raises(MalformedRequest):
        decode_request(b"[" * 100_000 + b"]" * 100_000)
    nested = b'{"inputs":[{"shape":[1],"datatype":"FP32","data":' + b"[" * 5000 + b"]" * 5000
    with pytest.raises(MalformedRequest):
        decode_request(nested + b"}]}")


def test_empty_payload_is_a_bad_request() -> None:
    for ctype in (None, "image/png", "application/json"):
        with pytest.raises(MalformedRequest, match="empty"):
            decode_request(b"", content_type=ctype)


def test_oversize_is_refused_before_parsing() -> None:
    payload = jbytes(request_doc())
    assert decode_request(payload, max_bytes=len(payload)).id == "r-1"
    with pytest.raises(PayloadTooLarge) as info:
        decode_request(payload, max_bytes=len(payload) - 1)
    assert info.value.code == "payload_too_large"
    assert not hasattr(info.value, "reply_to")  # nothing read: the reply goes to the default topic
    with pytest.raises(PayloadTooLarge):
        decode_request(b"\xff" * 100, max_bytes=99, content_type="nonsense/type")


def test_bad_json_keeps_the_id_and_reply_to_it_could_read() -> None:
    with pytest.raises(MalformedRequest) as info:
        decode_request(jbytes(request_doc(datatype="FP8")))
    assert (info.value.request_id, info.value.reply_to) == ("r-1", "app/replies")
    with pytest.raises(MalformedRequest) as info:  # a bad reply_to: answer on the default topic
        decode_request(jbytes(request_doc() | {"reply_to": "a/+"}))
    assert (info.value.request_id, info.value.reply_to) == ("r-1", None)
    with pytest.raises(MalformedRequest) as info:  # a bad id: still answer where asked
        decode_request(jbytes(request_doc() | {"id": 5}))
    assert (info.value.request_id, info.value.reply_to) == (None, "app/replies")
    with pytest.raises(MalformedRequest) as info:
        decode_request(b'{"id": "r-2", "reply_to": "a/b", "inputs": [')
    assert (info.value.request_id, info.value.reply_to) == (None, None)
    header = {"id": "r-3", "reply_to": "x/y", "inputs": [{"shape": [4], "datatype": "FP32"}]}
    with pytest.raises(MalformedRequest) as info:
        decode_request(etns(header, b"\0" * 15))
    assert (info.value.request_id, info.value.reply_to) == ("r-3", "x/y")


def test_reply_topic_precedence() -> None:
    assert reply_topic_for("mqtt5/topic", "body/topic", "edge/d/infer/m/reply") == "mqtt5/topic"
    assert reply_topic_for(None, "body/topic", "edge/d/infer/m/reply") == "body/topic"
    assert reply_topic_for("", None, "edge/d/infer/m/reply") == "edge/d/infer/m/reply"


# --- responses ---------------------------------------------------------------------------


def test_json_response_layout() -> None:
    scores = np.array([[0.25], [0.5]], np.float32)
    payload = encode_response(
        request_id="r-17",
        model="face",
        model_version="1.3.0",
        outputs=[("scores", scores), ("count", np.array(2, np.int64))],
        result={"detections": [{"label": "face", "score": 0.97, "box": [1, 2, 3, 4]}]},
        provider="CPUExecutionProvider",
        timing=Timing(0.04, 2.3144444, 2.52),
    )
    assert json.loads(payload) == {
        "id": "r-17",
        "model": "face",
        "model_version": "1.3.0",
        "outputs": [
            {"name": "scores", "shape": [2, 1], "datatype": "FP32", "data": [0.25, 0.5]},
            {"name": "count", "shape": [], "datatype": "INT64", "data": [2]},
        ],
        "result": {"detections": [{"label": "face", "score": 0.97, "box": [1, 2, 3, 4]}]},
        "provider": "CPUExecutionProvider",
        "timing_ms": {"queue": 0.04, "inference": 2.314, "total": 2.52},
    }


def test_response_without_id_outputs_or_result() -> None:
    doc = json.loads(
        encode_response(
            request_id=None,
            model="m",
            model_version="sha256:0123456789ab",
            outputs=None,
            result=None,
            provider="cpu",
            timing=Timing(0, 0, 0),
        )
    )
    assert set(doc) == {"model", "model_version", "provider", "timing_ms"}


@pytest.mark.parametrize("binary", [False, True])
def test_response_round_trip_every_datatype(binary: bool) -> None:
    outputs = [(dt.lower(), sample(dt, (3, 2))) for dt in ALL_DATATYPES]
    payload = encode_response(
        request_id="r",
        model="m",
        model_version="2",
        outputs=outputs,
        result={"top": [{"label": "cat", "score": 0.5}]},
        provider="XNNPACK",
        timing=Timing(1, 2, 3),
        binary=binary,
    )
    assert payload.startswith(b"ETNS") is binary
    if binary:
        assert (8 + int.from_bytes(payload[4:8], "big")) % 8 == 0
        assert b'"data"' not in payload[: 8 + int.from_bytes(payload[4:8], "big")]
    resp = decode_response(payload)
    assert isinstance(resp, InferResponse)
    assert (resp.id, resp.model, resp.model_version, resp.provider) == ("r", "m", "2", "XNNPACK")
    assert resp.result == {"top": [{"label": "cat", "score": 0.5}]}
    assert resp.timing == Timing(1, 2, 3)
    assert [t.name for t in resp.outputs] == [n for n, _ in outputs]
    for t, (_, ref) in zip(resp.outputs, outputs, strict=True):
        assert t.array.dtype == ref.dtype
        np.testing.assert_array_equal(t.array, ref)


def test_non_finite_outputs_are_strings_in_valid_json() -> None:
    y = np.array([np.nan, np.inf, -np.inf, 1.5], np.float32)
    payload = encode_response(
        request_id="r",
        model="m",
        model_version="1",
        outputs=[("y", y)],
        result={"score": float("nan"), "np": np.float32("inf")},
        provider="cpu",
        timing=Timing(0, 0, 0),
    )

    def refuse(name: str) -> None:
        raise AssertionError(f"invalid JSON literal {name}")

    doc = json.loads(payload, parse_constant=refuse)
    assert doc["outputs"][0]["data"] == ["NaN", "Infinity", "-Infinity", 1.5]
    assert doc["result"] == {"score": "NaN", "np": "Infinity"}
    out = decode_response(payload)
    assert isinstance(out, InferResponse)
    np.testing.assert_array_equal(out.outputs[0].array, y)


def test_output_dtypes_outside_the_protocol() -> None:
    def encode(arr: np.ndarray) -> bytes:
        return encode_response(
            request_id=None, model="m", model_version="1", outputs=[("o", arr)],
            result=None, provider="cpu", timing=Timing(0, 0, 0),
        )  # fmt: skip

    doc = json.loads(encode(np.array([4_000_000_000], np.uint32)))
    assert doc["outputs"][0]["datatype"] == "INT64" and doc["outputs"][0]["data"] == [4_000_000_000]
    assert json.loads(encode(np.array([5], np.uint64)))["outputs"][0]["datatype"] == "INT64"
    for arr in (np.array([2**64 - 1], np.uint64), np.array(["a"]), np.array([1j])):
        with pytest.raises(InferenceError):
            encode(arr)


def test_error_replies() -> None:
    assert json.loads(encode_error("r-17", "bad_input", "input 'x': expected shape [1,3]")) == {
        "id": "r-17",
        "error": {"code": "bad_input", "message": "input 'x': expected shape [1,3]"},
    }
    assert json.loads(encode_error(None, "overloaded", "queue\nfull")) == {
        "error": {"code": "overloaded", "message": "queue full"}
    }
    assert json.loads(encode_error("a", "inference_failed", "x"))["error"]["code"] == "internal"
    assert len(json.loads(encode_error("a", "internal", "x" * 5000))["error"]["message"]) == 500
    assert json.loads(encode_exception("i", UnknownModel("no model 'z'"))) == {
        "id": "i",
        "error": {"code": "unknown_model", "message": "no model 'z'"},
    }
    secret = json.loads(encode_exception(None, KeyError("/etc/secret")))
    assert secret == {"error": {"code": "internal", "message": "internal error"}}


@pytest.mark.parametrize(
    ("code", "cls"),
    [("bad_input", BadInput), ("overloaded", Overloaded), ("deadline_exceeded", DeadlineExceeded),
     ("payload_too_large", PayloadTooLarge), ("internal", RequestError)],
)  # fmt: skip
def test_decode_error_reply(code: str, cls: type[RequestError]) -> None:
    reply = decode_response(encode_error("r", code, "why"))
    assert reply == ErrorReply("r", code, "why")
    exc = reply.to_exception()
    assert type(exc) is cls and exc.code == code and exc.message == "why"


@pytest.mark.parametrize(
    "payload",
    [b"", b"[]", b"{}", b'{"error": "x"}', b'{"model": "m", "model_version": 1}',
     b'{"model":"m","model_version":"1","provider":"p","outputs":[{"name":"y"}]}',
     b"ETNS\x00\x00\x00\x02{}\x00"],
)  # fmt: skip
def test_decode_response_refuses_non_replies(payload: bytes) -> None:
    with pytest.raises(BadRequest):
        decode_response(payload)


# --- deadlines ---------------------------------------------------------------------------


def test_deadlines_count_from_receipt_and_the_earlier_wins() -> None:
    t0 = 1000.0
    assert request_deadline(t0) is None
    assert request_deadline(t0, deadline_ms=250) == pytest.approx(1000.25)
    assert request_deadline(t0, expiry_interval_s=2) == pytest.approx(1002.0)
    assert request_deadline(t0, deadline_ms=5000, expiry_interval_s=2) == pytest.approx(1002.0)
    assert request_deadline(t0, deadline_ms=100, expiry_interval_s=2) == pytest.approx(1000.1)
    assert request_deadline(t0, deadline_ms=0, expiry_interval_s=0) == t0
    assert request_deadline(t0, expiry_interval_s=-3) == t0
    deadline = request_deadline(t0, deadline_ms=100)
    assert not deadline_passed(deadline, 1000.05) and deadline_passed(deadline, 1000.1)
    assert not deadline_passed(None, 1e12)
    assert remaining_ms(deadline, 1000.04) == pytest.approx(60.0)
    assert remaining_ms(None, 0) is None


def test_request_deadline_from_a_decoded_request() -> None:
    doc = request_doc() | {"parameters": {"deadline_ms": 40}}
    req = decode_request(jbytes(doc))
    assert request_deadline(5.0, deadline_ms=req.parameters.deadline_ms) == pytest.approx(5.04)
    huge = request_doc() | {"parameters": {"deadline_ms": 10**400}}
    assert decode_request(jbytes(huge)).parameters.deadline_ms == 1e12


# --- documents ---------------------------------------------------------------------------

T0 = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)


def test_timestamps_are_rfc3339_utc_milliseconds() -> None:
    assert format_timestamp(T0) == "2026-11-23T10:00:00.123Z"
    plus2 = T0.astimezone(timezone(timedelta(hours=2)))
    assert format_timestamp(plus2) == "2026-11-23T10:00:00.123Z"
    with pytest.raises(ValueError, match="timezone"):
        format_timestamp(datetime(2026, 1, 1))
    with pytest.raises(ValidationError):
        DesiredHint.model_validate({"revision": -1})


def test_status_document_online_and_offline() -> None:
    models = {
        "face": ModelStatus(
            version="1.3.0", state="ready", format="onnx", provider="TensorrtExecutionProvider"
        )
    }
    status = StatusDocument(
        state="online", agent_version="0.3.0", profile="jetson-orin-nano", started_at=T0, ts=T0,
        models=models,
    )  # fmt: skip
    assert json.loads(status.to_json()) == {
        "state": "online",
        "ts": "2026-11-23T10:00:00.123Z",
        "agent_version": "0.3.0",
        "profile": "jetson-orin-nano",
        "started_at": "2026-11-23T10:00:00.123Z",
        "models": {
            "face": {
                "version": "1.3.0",
                "state": "ready",
                "format": "onnx",
                "provider": "TensorrtExecutionProvider",
            }
        },
    }
    assert decode_document(StatusDocument, status.to_json()) == status
    offline = StatusDocument(state="offline", ts=T0)
    assert json.loads(offline.to_json()) == {"state": "offline", "ts": "2026-11-23T10:00:00.123Z"}


@pytest.mark.parametrize(
    "doc",
    [
        {"state": "online", "ts": "2026-11-23T10:00:00Z"},
        {"state": "degraded", "ts": "2026-11-23T10:00:00Z", "agent_version": "1", "profile": "p"},
        {"state": "sleeping", "ts": "2026-11-23T10:00:00Z"},
        {"state": "offline"},
        {"state": "offline", "ts": "2026-11-23T10:00:00"},
        {"state": "offline", "ts": 1763892000},
        {"state": "offline", "ts": "yesterday"},
        {"state": "offline", "ts": "2026-11-23T10:00:00Z", "models": {"a/b": {}}},
        {"state": "offline", "ts": "2026-11-23T10:00:00Z",
         "models": {"m": {"version": "1", "state": "busy", "format": "onnx", "provider": "c"}}},
    ],
)  # fmt: skip
def test_status_documents_refused(doc: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        decode_document(StatusDocument, jbytes(doc))


def test_documents_ignore_unknown_fields() -> None:
    doc = {"state": "offline", "ts": "2026-11-23T12:00:00.5+02:00", "reason": "shutdown", "v": 2}
    status = decode_document(StatusDocument, jbytes(doc))
    assert status.ts == datetime(2026, 11, 23, 10, 0, 0, 500000, tzinfo=UTC)
    assert decode_document(DesiredHint, b'{"revision": 7, "note": "x"}') == DesiredHint(revision=7)
    for bad in (b"", b'{"revision": "7"}', b'{"revision": true}', b'{"revision": 1.5}', b"[7]"):
        with pytest.raises(BadRequest):
            decode_document(DesiredHint, bad)


def _telemetry(temperature: float | None) -> TelemetryDocument:
    system = SystemTelemetry(
        cpu_percent=12.5, mem_used_bytes=1 << 30, mem_total_bytes=4 << 30,
        agent_rss_bytes=80 << 20, disk_free_bytes=10 << 30, temperature_c=temperature,
    )  # fmt: skip
    models = {
        "face": ModelTelemetry(
            requests=120, errors={"bad_input": 2}, queue_depth=1, provider="CPUExecutionProvider",
            latency_ms=LatencyMs(p50=2.1, p95=3.4, p99=5.0),
        ),
        "vad": ModelTelemetry(
            requests=0, errors={}, latency_ms=None, queue_depth=0, provider="cpu"
        ),
    }  # fmt: skip
    return TelemetryDocument(ts=T0, seq=42, system=system, models=models)


def test_telemetry_document() -> None:
    doc = json.loads(_telemetry(None).to_json())
    assert doc["ts"] == "2026-11-23T10:00:00.123Z" and doc["seq"] == 42
    assert "temperature_c" not in doc["system"]
    assert doc["system"]["mem_total_bytes"] == 4 << 30
    assert doc["models"]["face"] == {
        "requests": 120,
        "errors": {"bad_input": 2},
        "latency_ms": {"p50": 2.1, "p95": 3.4, "p99": 5.0},
        "queue_depth": 1,
        "provider": "CPUExecutionProvider",
    }
    assert doc["models"]["vad"]["latency_ms"] is None
    warm = _telemetry(61.5)
    assert json.loads(warm.to_json())["system"]["temperature_c"] == 61.5
    assert decode_document(TelemetryDocument, warm.to_json()) == warm
    doc["seq"] = -1
    with pytest.raises(BadRequest, match="seq"):
        decode_document(TelemetryDocument, jbytes(doc))


def test_update_events() -> None:
    ok = UpdateEvent(
        ts=T0, rollout_id="ro-9", model="face", from_version="1.2.0", to_version="1.3.0",
        state="verifying",
    )  # fmt: skip
    assert json.loads(ok.to_json()) == {
        "ts": "2026-11-23T10:00:00.123Z", "rollout_id": "ro-9", "model": "face",
        "from_version": "1.2.0", "to_version": "1.3.0", "state": "verifying", "reason": None,
    }  # fmt: skip
    failed = ok.model_copy(update={"state": "rolled_back"})
    with pytest.raises(BadRequest, match="reason"):
        decode_document(UpdateEvent, failed.to_json())
    reason = ErrorInfo(code="probation_failed", message="error rate 12% over 5%")
    rolled = UpdateEvent(**(ok.model_dump() | {"state": "rolled_back", "reason": reason}))
    assert json.loads(rolled.to_json())["reason"] == {
        "code": "probation_failed",
        "message": "error rate 12% over 5%",
    }
    assert decode_document(UpdateEvent, rolled.to_json()) == rolled
    with pytest.raises(ValidationError):
        UpdateEvent(**(ok.model_dump() | {"reason": reason}))
    with pytest.raises(ValidationError):
        UpdateEvent(**(ok.model_dump() | {"state": "installing"}))


def test_commands_and_replies() -> None:
    cmd = Command(id="c-1", command="reload_models", args={"model": "face"}, ts=T0)
    assert json.loads(cmd.to_json()) == {
        "id": "c-1", "command": "reload_models", "args": {"model": "face"},
        "ts": "2026-11-23T10:00:00.123Z",
    }  # fmt: skip
    assert decode_document(Command, cmd.to_json()) == cmd
    with pytest.raises(BadRequest):
        decode_document(Command, b'{"id": "c", "command": "rm -rf", "ts": "2026-11-23T10:00:00Z"}')
    done = CommandReply(id="c-1", ts=T0, result={"reloaded": 1})
    assert json.loads(done.to_json()) == {
        "id": "c-1", "ts": "2026-11-23T10:00:00.123Z", "result": {"reloaded": 1},
    }  # fmt: skip
    err = CommandReply(id="c-1", ts=T0, error=ErrorInfo(code="unknown_command", message="no"))
    assert json.loads(err.to_json())["error"] == {"code": "unknown_command", "message": "no"}
    assert "result" not in json.loads(err.to_json())
    with pytest.raises(ValidationError):
        CommandReply(id="c-1", ts=T0)
