"""MQTT topics of the device protocol: names, builders, the parser and topic checks.

Every device topic is ``{prefix}/{device}/{kind...}``. The prefix (default ``edge``) may
have several levels (``plant-3/edge``); device ids and model names use the alphabet
``[A-Za-z0-9_.-]{1,64}``. The parser is strict: the fleet server takes a device's identity
from the topic the broker authorised, so anything malformed is refused, never guessed.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import NamedTuple

from agent.errors import BadRequest

DEFAULT_PREFIX = "edge"

#: Device ids and model names.
_ID_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
#: MQTT's limit on a topic name, in UTF-8 bytes.
MAX_TOPIC_BYTES = 65535


class TopicKind(StrEnum):
    """What a device topic carries."""

    INFER = "infer"
    INFER_REPLY = "infer_reply"
    STATUS = "status"
    TELEMETRY = "telemetry"
    DESIRED = "desired"
    UPDATE = "update"
    CMD = "cmd"
    CMD_REPLY = "cmd_reply"


#: Topic levels after ``{prefix}/{device}`` for the kinds without a model.
_SUFFIXES: dict[tuple[str, ...], TopicKind] = {
    ("status",): TopicKind.STATUS,
    ("telemetry",): TopicKind.TELEMETRY,
    ("desired",): TopicKind.DESIRED,
    ("update",): TopicKind.UPDATE,
    ("cmd",): TopicKind.CMD,
    ("cmd", "reply"): TopicKind.CMD_REPLY,
}


class ParsedTopic(NamedTuple):
    """A device topic, taken apart: ``device, kind, model = parse_topic(...)``."""

    device: str
    kind: TopicKind
    model: str | None


def is_valid_id(value: str) -> bool:
    """True when ``value`` is a valid device id or model name."""
    return _ID_RE.fullmatch(value) is not None


def check_id(value: str, what: str = "device id") -> str:
    """Return ``value`` when it is a valid device id / model name.

    Raises:
        BadRequest: it is not ``[A-Za-z0-9_.-]{1,64}``.
    """
    if not isinstance(value, str) or not is_valid_id(value):
        raise BadRequest(f"invalid {what} {value!r}: expected [A-Za-z0-9_.-]{{1,64}}")
    return value


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` when it is a usable topic prefix (one or more non-empty levels).

    Raises:
        BadRequest: empty levels, wildcards, NUL, or a leading ``$``.
    """
    if (
        not isinstance(prefix, str)
        or not prefix
        or prefix.startswith("$")
        or any(c in prefix for c in "+#\0")
        or "" in prefix.split("/")
    ):
        raise BadRequest(f"invalid topic prefix {prefix!r}")
    return prefix


def check_publish_topic(topic: str) -> str:
    """Return ``topic`` when a client may publish to it (used for ``reply_to``).

    Raises:
        BadRequest: empty, wildcards, NUL, a ``$`` system topic, or over 65535 bytes.
    """
    if isinstance(topic, str) and topic and not topic.startswith("$"):
        try:
            size = len(topic.encode("utf-8"))
        except UnicodeEncodeError:  # a lone surrogate from a JSON escape
            size = MAX_TOPIC_BYTES + 1
        if size <= MAX_TOPIC_BYTES and not any(c in topic for c in "+#\0"):
            return topic
    raise BadRequest(f"invalid reply topic {str(topic)[:80]!r}")


def _base(device: str, prefix: str) -> str:
    return f"{check_prefix(prefix)}/{check_id(device)}"


def infer_topic(device: str, model: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``{prefix}/{device}/infer/{model}``. Raises BadRequest on an invalid part."""
    return f"{_base(device, prefix)}/infer/{check_id(model, 'model name')}"


def default_reply_topic(device: str, model: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``{prefix}/{device}/infer/{model}/reply``. Raises BadRequest on an invalid part."""
    return f"{infer_topic(device, model, prefix)}/reply"


def status_topic(device: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``{prefix}/{device}/status``. Raises BadRequest on an invalid part."""
    return f"{_base(device, prefix)}/status"


def telemetry_topic(device: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``{prefix}/{device}/telemetry``. Raises BadRequest on an invalid part."""
    return f"{_base(device, prefix)}/telemetry"


def desired_topic(device: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``{prefix}/{device}/desired``. Raises BadRequest on an invalid part."""
    return f"{_base(device, prefix)}/desired"


def update_topic(device: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``{prefix}/{device}/update``. Raises BadRequest on an invalid part."""
    return f"{_base(device, prefix)}/update"


def cmd_topic(device: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``{prefix}/{device}/cmd``. Raises BadRequest on an invalid part."""
    return f"{_base(device, prefix)}/cmd"


def cmd_reply_topic(device: str, prefix: str = DEFAULT_PREFIX) -> str:
    """``{prefix}/{device}/cmd/reply``. Raises BadRequest on an invalid part."""
    return f"{_base(device, prefix)}/cmd/reply"


def infer_filter(device: str, prefix: str = DEFAULT_PREFIX) -> str:
    """The agent's subscription for its requests: ``{prefix}/{device}/infer/+``."""
    return f"{_base(device, prefix)}/infer/+"


def fleet_filter(kind: TopicKind, prefix: str = DEFAULT_PREFIX) -> str:
    """The fleet server's subscription for one kind from every device (``edge/+/status``).

    Raises:
        BadRequest: ``kind`` has a model level (infer topics are not the server's).
    """
    for levels, k in _SUFFIXES.items():
        if k is kind:
            return "/".join((check_prefix(prefix), "+", *levels))
    raise BadRequest(f"no fleet subscription for topic kind {kind}")


def parse_topic(topic: str, prefix: str = DEFAULT_PREFIX) -> ParsedTopic:
    """Take a device topic apart into ``(device, kind, model)``; ``model`` only for infer kinds.

    Raises:
        BadRequest: the topic is not exactly one of the protocol's device topics under
            ``prefix`` (other prefix, wildcards, empty levels, invalid ids, extra levels).
    """
    check_prefix(prefix)
    if not isinstance(topic, str) or not topic.startswith(prefix + "/"):
        raise BadRequest(f"topic {str(topic)[:80]!r} is not under prefix {prefix!r}")
    levels = topic[len(prefix) + 1 :].split("/")
    device, rest = levels[0], tuple(levels[1:])
    if not is_valid_id(device):
        raise BadRequest(f"topic {topic[:80]!r}: invalid device id")
    kind = _SUFFIXES.get(rest)
    if kind is not None:
        return ParsedTopic(device, kind, None)
    if len(rest) in (2, 3) and rest[0] == "infer" and rest[2:] in ((), ("reply",)):
        if not is_valid_id(rest[1]):
            raise BadRequest(f"topic {topic[:80]!r}: invalid model name")
        return ParsedTopic(
            device, TopicKind.INFER if len(rest) == 2 else TopicKind.INFER_REPLY, rest[1]
        )
    raise BadRequest(f"topic {topic[:80]!r} is not a device topic")


def is_control_topic(topic: str, device: str, prefix: str = DEFAULT_PREFIX) -> bool:
    """True when ``topic`` is one of the device's own non-reply topics.

    An agent SHOULD refuse a request's ``reply_to`` that points there: a reply must not
    be able to pose as the device's status, telemetry, update events or commands.
    """
    try:
        parsed = parse_topic(topic, prefix)
    except BadRequest:
        return False
    return parsed.device == device and parsed.kind is not TopicKind.INFER_REPLY
