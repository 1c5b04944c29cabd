"""Inference requests: payload kinds, content types, and the request decoder.

:func:`decode_request` turns a message payload into an :class:`InferRequest`. It raises
only :class:`~agent.errors.PayloadTooLarge` (checked first, nothing parsed) and
:class:`MalformedRequest` (a ``BadRequest`` that carries the ``id`` and ``reply_to`` it
could still read, so that the error can be answered where the client listens).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Any

from agent.errors import BadRequest, PayloadTooLarge
from agent.protocol.tensors import (
    Array,
    WireTensor,
    array_from_data,
    check_shape,
    dtype_of,
    dumps,
    load_json_object,
    read_etns,
    read_npy,
    split_tensors,
    wire_array,
    write_etns,
)
from agent.protocol.topics import check_publish_topic

DEFAULT_MAX_BYTES = 8 * 1024 * 1024


class PayloadKind(StrEnum):
    """The four request payload kinds, numbered as in the protocol."""

    JSON = "json"  # 1
    NPY = "npy"  # 2
    IMAGE = "image"  # 3
    TENSORS = "tensors"  # 4, ETNS


#: MQTT 5 Content Type -> kind (compared without parameters, case-insensitively).
CONTENT_TYPES: dict[str, PayloadKind] = {
    "application/json": PayloadKind.JSON,
    "application/x-npy": PayloadKind.NPY,
    "image/jpeg": PayloadKind.IMAGE,
    "image/png": PayloadKind.IMAGE,
    "application/x-edge-tensors": PayloadKind.TENSORS,
}
_MAGIC: tuple[tuple[bytes, PayloadKind], ...] = (
    (b"\x93NUMPY", PayloadKind.NPY),
    (b"\xff\xd8\xff", PayloadKind.IMAGE),
    (b"\x89PNG\r\n\x1a\n", PayloadKind.IMAGE),
    (b"ETNS", PayloadKind.TENSORS),
)


class MalformedRequest(BadRequest):
    """A ``bad_request`` with whatever ``id`` and ``reply_to`` could be read before it failed."""

    def __init__(
        self, message: str, *, request_id: str | None = None, reply_to: str | None = None
    ) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.reply_to = reply_to


@dataclass(frozen=True, slots=True)
class RequestParameters:
    """The ``parameters`` object of a request (unknown keys are ignored)."""

    deadline_ms: float | None = None
    binary_outputs: bool = False
    raw_outputs: bool = False
    quantized: bool = False


@dataclass(frozen=True, slots=True)
class InferRequest:
    """A decoded request: either ``tensors`` (kinds 1, 2, 4) or ``image`` (kind 3).

    Tensors from binary kinds may be read-only views of the payload.
    """

    kind: PayloadKind
    id: str | None = None
    reply_to: str | None = None
    parameters: RequestParameters = RequestParameters()
    tensors: tuple[WireTensor, ...] = ()
    image: bytes | None = None


def payload_kind(payload: bytes | bytearray | memoryview, content_type: str | None) -> PayloadKind:
    """The kind named by ``content_type`` (MIME parameters ignored), else sniffed from magic.

    An empty content type counts as absent. Anything without a known magic is JSON.

    Raises:
        BadRequest: a content type the protocol does not know.
    """
    if content_type:
        media = content_type.split(";", 1)[0].strip().lower()
        kind = CONTENT_TYPES.get(media)
        if kind is None:
            raise BadRequest(f"unknown content type {content_type[:80]!r}")
        return kind
    head = bytes(payload[:8])
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    return PayloadKind.JSON


def decode_request(
    payload: bytes | bytearray | memoryview,
    *,
    content_type: str | None = None,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> InferRequest:
    """Decode an inference request payload (see the module docstring for the kinds).

    Raises:
        PayloadTooLarge: ``len(payload) > max_bytes`` (checked before anything is parsed).
        MalformedRequest: an unparseable payload, unknown content type, missing or
            ill-typed field, unknown datatype, out-of-range value or size mismatch.
    """
    if len(payload) > max_bytes:
        raise PayloadTooLarge(f"payload of {len(payload)} bytes is over the {max_bytes}-byte limit")
    if not payload:
        raise MalformedRequest("empty payload")
    try:
        kind = payload_kind(payload, content_type)
    except BadRequest as exc:
        raise MalformedRequest(exc.message) from None
    if kind is PayloadKind.IMAGE:
        return InferRequest(kind, image=payload if isinstance(payload, bytes) else bytes(payload))
    view = memoryview(payload)
    if kind is PayloadKind.NPY:
        try:
            return InferRequest(kind, tensors=(WireTensor(None, read_npy(view)),))
        except BadRequest as exc:
            raise MalformedRequest(exc.message) from None
    try:
        if kind is PayloadKind.JSON:
            body = payload if isinstance(payload, bytes) else bytes(payload)
            doc, raw = load_json_object(body, "request"), None
        else:
            doc, raw = read_etns(view)
    except BadRequest as exc:
        raise MalformedRequest(exc.message) from None
    request_id, reply_to = _recover(doc)
    try:
        return _from_document(kind, doc, raw)
    except BadRequest as exc:
        raise MalformedRequest(exc.message, request_id=request_id, reply_to=reply_to) from None


def _recover(doc: dict[str, Any]) -> tuple[str | None, str | None]:
    """The ``id`` and ``reply_to`` of a document, each ``None`` when missing or invalid."""
    rid = doc.get("id")
    reply = doc.get("reply_to")
    try:
        reply = check_publish_topic(reply) if reply is not None else None
    except BadRequest:
        reply = None
    return (rid if isinstance(rid, str) else None), reply


def _from_document(kind: PayloadKind, doc: dict[str, Any], raw: memoryview | None) -> InferRequest:
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest("'id' must be a string")
    reply = doc.get("reply_to")
    if reply is not None:
        check_publish_topic(reply)
    params = _parameters(doc.get("parameters"))
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    specs = [_input_spec(i, spec, len(inputs)) for i, spec in enumerate(inputs)]
    names = [name for name, _, _ in specs if name is not None]
    if len(set(names)) != len(names):
        raise BadRequest("input names must be unique")
    if raw is None:
        tensors = [
            WireTensor(name, array_from_data(inp.get("data"), shape, dt, _what(i, name)))
            for i, ((name, shape, dt), inp) in enumerate(zip(specs, inputs, strict=True))
        ]
    else:
        tensors = split_tensors(raw, specs)
    return InferRequest(kind, rid, reply, params, tuple(tensors))


def _what(index: int, name: str | None) -> str:
    return f"input {name!r}" if name is not None else f"input {index}"


def _input_spec(index: int, spec: object, count: int) -> tuple[str | None, tuple[int, ...], str]:
    if not isinstance(spec, dict):
        raise BadRequest(f"input {index} must be an object")
    name = spec.get("name")
    if name is not None and (not isinstance(name, str) or not name):
        raise BadRequest(f"input {index}: 'name' must be a non-empty string")
    if name is None and count > 1:
        raise BadRequest(f"input {index}: 'name' is required when there are several inputs")
    what = _what(index, name)
    if "shape" not in spec:
        raise BadRequest(f"{what}: 'shape' is missing")
    shape = check_shape(spec["shape"], what)
    if "datatype" not in spec:
        raise BadRequest(f"{what}: 'datatype' is missing")
    datatype = spec["datatype"]
    dtype_of(datatype)
    return name, shape, datatype


_BOOL_PARAMETERS = ("binary_outputs", "raw_outputs", "quantized")
#: Larger deadlines (about 31 years) are clamped: they mean "no hurry" anyway.
_MAX_DEADLINE_MS = 10**12


def _parameters(value: object) -> RequestParameters:
    if value is None:
        return RequestParameters()
    if not isinstance(value, dict):
        raise BadRequest("'parameters' must be an object")
    deadline = value.get("deadline_ms")
    if deadline is not None:
        if type(deadline) is int:
            deadline = float(min(deadline, _MAX_DEADLINE_MS))  # huge ints overflow a float
        if type(deadline) is not float or not math.isfinite(deadline) or deadline < 0:
            raise BadRequest("'parameters.deadline_ms' must be a non-negative number")
    flags: dict[str, bool] = {}
    for key in _BOOL_PARAMETERS:
        flag = value.get(key)
        if flag is not None and not isinstance(flag, bool):
            raise BadRequest(f"'parameters.{key}' must be true or false")
        flags[key] = bool(flag)
    return RequestParameters(
        deadline_ms=deadline,
        binary_outputs=flags["binary_outputs"],
        raw_outputs=flags["raw_outputs"],
        quantized=flags["quantized"],
    )


def reply_topic_for(response_topic: str | None, reply_to: str | None, default: str) -> str:
    """Where to answer: the MQTT 5 Response Topic, else the body's ``reply_to``, else ``default``.

    ``reply_to`` is :attr:`InferRequest.reply_to` or :attr:`MalformedRequest.reply_to`.
    """
    if response_topic:
        return response_topic
    return reply_to or default


def encode_request(
    inputs: Sequence[tuple[str | None, Array]],
    *,
    request_id: str | None = None,
    reply_to: str | None = None,
    parameters: RequestParameters | None = None,
    binary: bool = False,
) -> bytes:
    """A client's request: JSON (kind 1), or ``ETNS`` binary tensors (kind 4) when ``binary``.

    Only the parameters that differ from their defaults are written.

    Raises:
        ValueError: an array's dtype has no protocol datatype.
    """
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    if reply_to is not None:
        doc["reply_to"] = reply_to
    described, arrays = [], []
    for name, array in inputs:
        datatype, wire = wire_array(array)
        spec: dict[str, Any] = {} if name is None else {"name": name}
        spec.update(shape=list(wire.shape), datatype=datatype)
        if not binary:
            spec["data"] = wire.ravel().tolist()
        described.append(spec)
        arrays.append(wire)
    doc["inputs"] = described
    if parameters is not None:
        defaults = asdict(RequestParameters())
        doc["parameters"] = {k: v for k, v in asdict(parameters).items() if v != defaults[k]}
    return write_etns(doc, arrays) if binary else dumps(doc)
