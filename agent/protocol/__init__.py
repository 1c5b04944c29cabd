"""The device protocol v1 (``PROTOCOL.md``): topics, payload kinds, codecs and documents.

Shared by the agent and the fleet server, so it imports only numpy, pydantic, the
standard library and :mod:`agent.errors`. The parts:

- :mod:`.topics`     topic builders, the strict parser, subscription filters
- :mod:`.tensors`    datatype names, JSON ``data`` lists, ``.npy`` and ``ETNS`` frames
- :mod:`.request`    payload kinds and :func:`decode_request`
- :mod:`.response`   :func:`encode_response`, :func:`encode_error`, :func:`decode_response`
- :mod:`.deadlines`  ``deadline_ms`` and the MQTT 5 Message Expiry Interval
- :mod:`.documents`  status, telemetry, update events, commands, the desired hint
"""

from __future__ import annotations

from agent.protocol.deadlines import deadline_passed, remaining_ms, request_deadline
from agent.protocol.documents import (
    Command,
    CommandReply,
    DesiredHint,
    Document,
    ErrorInfo,
    LatencyMs,
    ModelStatus,
    ModelTelemetry,
    StatusDocument,
    SystemTelemetry,
    TelemetryDocument,
    UpdateEvent,
    decode_document,
    format_timestamp,
    parse_timestamp,
    utc_now,
)
from agent.protocol.request import (
    CONTENT_TYPES,
    DEFAULT_MAX_BYTES,
    InferRequest,
    MalformedRequest,
    PayloadKind,
    RequestParameters,
    decode_request,
    encode_request,
    payload_kind,
    reply_topic_for,
)
from agent.protocol.response import (
    ErrorReply,
    InferResponse,
    Timing,
    decode_response,
    encode_error,
    encode_exception,
    encode_response,
)
from agent.protocol.tensors import (
    DATATYPES,
    ETNS_MAGIC,
    WireTensor,
    datatype_of,
    dtype_of,
)
from agent.protocol.topics import (
    DEFAULT_PREFIX,
    ParsedTopic,
    TopicKind,
    check_id,
    check_prefix,
    check_publish_topic,
    cmd_reply_topic,
    cmd_topic,
    default_reply_topic,
    desired_topic,
    fleet_filter,
    infer_filter,
    infer_topic,
    is_control_topic,
    is_valid_id,
    parse_topic,
    status_topic,
    telemetry_topic,
    update_topic,
)

__all__ = [
    "CONTENT_TYPES",
    "DATATYPES",
    "DEFAULT_MAX_BYTES",
    "DEFAULT_PREFIX",
    "ETNS_MAGIC",
    "Command",
    "CommandReply",
    "DesiredHint",
    "Document",
    "ErrorInfo",
    "ErrorReply",
    "InferRequest",
    "InferResponse",
    "LatencyMs",
    "MalformedRequest",
    "ModelStatus",
    "ModelTelemetry",
    "ParsedTopic",
    "PayloadKind",
    "RequestParameters",
    "StatusDocument",
    "SystemTelemetry",
    "TelemetryDocument",
    "Timing",
    "TopicKind",
    "UpdateEvent",
    "WireTensor",
    "check_id",
    "check_prefix",
    "check_publish_topic",
    "cmd_reply_topic",
    "cmd_topic",
    "datatype_of",
    "deadline_passed",
    "decode_document",
    "decode_request",
    "decode_response",
    "default_reply_topic",
    "desired_topic",
    "dtype_of",
    "encode_error",
    "encode_exception",
    "encode_request",
    "encode_response",
    "fleet_filter",
    "format_timestamp",
    "infer_filter",
    "infer_topic",
    "is_control_topic",
    "is_valid_id",
    "parse_timestamp",
    "parse_topic",
    "payload_kind",
    "remaining_ms",
    "reply_topic_for",
    "request_deadline",
    "status_topic",
    "telemetry_topic",
    "update_topic",
    "utc_now",
]
