"""Inference responses and error replies: the agent's encoders and a client's decoder.

A response is JSON, or an ``ETNS`` frame (kind 4) when the request asked for
``binary_outputs``: the same document with ``outputs`` in the header (without ``data``)
and their raw little-endian bytes after it, in header order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.errors import (
    PROTOCOL_ERROR_CODES,
    BadRequest,
    EdgeError,
    InferenceError,
    RequestError,
    protocol_code,
)
from agent.protocol.tensors import (
    ETNS_MAGIC,
    Array,
    WireTensor,
    array_from_data,
    check_shape,
    dtype_of,
    dumps,
    dumps_fast,
    json_data,
    jsonable,
    load_json_object,
    read_etns,
    split_tensors,
    wire_array,
    write_etns,
)

MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True, slots=True)
class Timing:
    """Where a request's time went, in milliseconds."""

    queue_ms: float
    inference_ms: float
    total_ms: float

    def to_dict(self) -> dict[str, float]:
        """The ``timing_ms`` object, rounded to microseconds."""
        return {
            "queue": round(self.queue_ms, 3),
            "inference": round(self.inference_ms, 3),
            "total": round(self.total_ms, 3),
        }


@dataclass(frozen=True, slots=True)
class InferResponse:
    """A decoded inference response (what a client reads)."""

    id: str | None
    model: str
    model_version: str
    outputs: tuple[WireTensor, ...]
    result: dict[str, Any] | None
    provider: str
    timing: Timing | None


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """A decoded error reply."""

    id: str | None
    code: str
    message: str

    def to_exception(self) -> RequestError:
        """The :class:`RequestError` subclass for ``code`` (``RequestError`` for ``internal``)."""
        for cls in RequestError.__subclasses__():
            if cls.code == self.code:
                return cls(self.message)
        return RequestError(self.message, code=self.code)


def encode_response(
    *,
    request_id: str | None,
    model: str,
    model_version: str,
    outputs: Sequence[tuple[str, Array]] | None,
    result: Mapping[str, Any] | None,
    provider: str,
    timing: Timing,
    binary: bool = False,
) -> bytes:
    """Encode a response; ``outputs`` is left out when ``None``, ``result`` too.

    Non-finite floats become ``"NaN"``/``"Infinity"``/``"-Infinity"`` in JSON.

    Raises:
        InferenceError: an output's dtype has no protocol datatype (strings, complex...).
    """
    doc: dict[str, Any] = {}
    if request_id is not None:
        doc["id"] = request_id
    doc["model"] = model
    doc["model_version"] = model_version
    arrays: list[Array] = []
    if outputs is not None:
        described = []
        for name, array in outputs:
            try:
                datatype, wire = wire_array(array)
            except ValueError as exc:
                raise InferenceError(f"output {name!r}: {exc}") from None
            out: dict[str, Any] = {"name": name, "shape": list(wire.shape), "datatype": datatype}
            if not binary:
                out["data"] = json_data(wire)
            described.append(out)
            arrays.append(wire)
        doc["outputs"] = described
    if result is not None:
        doc["result"] = jsonable(result)  # NaN/Inf as strings; small
    doc["provider"] = provider
    doc["timing_ms"] = timing.to_dict()
    return write_etns(doc, arrays) if binary else dumps_fast(doc)


def encode_error(request_id: str | None, code: str, message: str) -> bytes:
    """``{"id", "error": {"code", "message"}}``; ``id`` is left out when ``None``.

    A code that is not one of the protocol's is sent as ``internal``; the message is
    made one line and cut to 500 characters.
    """
    if code not in PROTOCOL_ERROR_CODES:
        code = "internal"
    line = " ".join(message.split())[:MAX_MESSAGE_CHARS]
    doc: dict[str, Any] = {} if request_id is None else {"id": request_id}
    doc["error"] = {"code": code, "message": line}
    return dumps(doc)


def encode_exception(request_id: str | None, exc: BaseException) -> bytes:
    """The error reply for ``exc``: its code and message, or ``internal`` for a foreign error.

    The message of an exception that is not an :class:`EdgeError` is not shown (it may
    hold internals); the reply just says ``internal error``.
    """
    code = protocol_code(exc)
    message = exc.message if isinstance(exc, EdgeError) else "internal error"
    return encode_error(request_id, code, message)


def decode_response(payload: bytes | bytearray | memoryview) -> InferResponse | ErrorReply:
    """Read a JSON or binary (``ETNS``) reply, as a client does.

    Raises:
        BadRequest: the payload is not a reply of the protocol.
    """
    view = memoryview(payload)
    raw: memoryview | None = None
    if bytes(view[:4]) == ETNS_MAGIC:
        doc, raw = read_etns(view)
    else:
        doc = load_json_object(bytes(payload), "reply")
    rid = doc.get("id")
    if rid is not None and not isinstance(rid, str):
        raise BadRequest("reply 'id' must be a string")
    error = doc.get("error")
    if error is not None:
        if not isinstance(error, dict) or not all(
            isinstance(error.get(k), str) for k in ("code", "message")
        ):
            raise BadRequest("reply 'error' must have string 'code' and 'message'")
        return ErrorReply(rid, error["code"], error["message"])
    for key in ("model", "model_version", "provider"):
        if not isinstance(doc.get(key), str):
            raise BadRequest(f"reply {key!r} must be a string")
    result = doc.get("result")
    if result is not None and not isinstance(result, dict):
        raise BadRequest("reply 'result' must be an object")
    return InferResponse(
        id=rid,
        model=doc["model"],
        model_version=doc["model_version"],
        outputs=_outputs(doc.get("outputs"), raw),
        result=result,
        provider=doc["provider"],
        timing=_timing(doc.get("timing_ms")),
    )


def _outputs(value: object, raw: memoryview | None) -> tuple[WireTensor, ...]:
    if value is None:
        if raw is not None and len(raw):
            raise BadRequest("reply has tensor bytes but no 'outputs'")
        return ()
    if not isinstance(value, list):
        raise BadRequest("reply 'outputs' must be a list")
    specs = []
    for i, out in enumerate(value):
        if not isinstance(out, dict) or not isinstance(out.get("name"), str):
            raise BadRequest(f"reply output {i} must be an object with a 'name'")
        dtype_of(out.get("datatype"))
        specs.append((out["name"], check_shape(out.get("shape"), out["name"]), out["datatype"]))
    if raw is not None:
        return tuple(split_tensors(raw, specs))
    return tuple(
        WireTensor(name, array_from_data(out.get("data"), shape, dt, f"output {name!r}"))
        for (name, shape, dt), out in zip(specs, value, strict=True)
    )


def _timing(value: object) -> Timing | None:
    if not isinstance(value, dict):
        return None
    parts = [value.get(k) for k in ("queue", "inference", "total")]
    try:
        ms = [float(p) for p in parts if type(p) in (int, float)]  # type: ignore[arg-type]
    except OverflowError:
        return None
    return Timing(ms[0], ms[1], ms[2]) if len(ms) == 3 else None
