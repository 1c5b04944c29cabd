"""MQTT topic names and topic filters: validation and matching (MQTT 5 section 4.7).

Both transports use these functions, so the in-memory fake routes messages exactly as a
broker does: ``+`` matches one level, ``#`` matches any number of trailing levels
(including none: ``a/#`` matches ``a``), and a wildcard at the first level never
matches a topic that starts with ``$`` (``$SYS/...``). A shared subscription
``$share/{group}/{filter}`` matches what ``{filter}`` matches.
"""

from __future__ import annotations

_MAX_TOPIC_BYTES = 65535
_SHARE_PREFIX = "$share/"


def validate_topic_name(topic: str) -> str:
    """Return ``topic`` if it is a valid topic name to publish to.

    Raises:
        ValueError: empty, longer than 65535 UTF-8 bytes, containing NUL, ``+`` or ``#``.
    """
    _check_common(topic, "topic")
    if "+" in topic or "#" in topic:
        raise ValueError(f"topic {topic!r}: wildcards are not allowed in a topic name")
    return topic


def validate_topic_filter(topic_filter: str) -> str:
    """Return ``topic_filter`` if it is a valid subscription filter.

    Raises:
        ValueError: empty, too long, containing NUL, ``#`` that is not a whole last
            level, ``+`` that is not a whole level, or a malformed ``$share/`` filter.
    """
    _check_common(topic_filter, "topic filter")
    levels = _effective_filter(topic_filter).split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ValueError(f"topic filter {topic_filter!r}: '#' must be the whole last level")
        if "+" in level and level != "+":
            raise ValueError(f"topic filter {topic_filter!r}: '+' must be a whole level")
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Whether a message published to ``topic`` is delivered to ``topic_filter``.

    Both arguments are assumed valid (see :func:`validate_topic_filter` and
    :func:`validate_topic_name`); this function does not raise.
    """
    pattern = _effective_filter(topic_filter).split("/")
    levels = topic.split("/")
    if topic.startswith("$") and pattern[0] in ("+", "#"):
        return False
    for i, part in enumerate(pattern):
        if part == "#":
            return True
        if i >= len(levels):
            return False
        if part != "+" and part != levels[i]:
            return False
    return len(pattern) == len(levels)


def _effective_filter(topic_filter: str) -> str:
    """The filter part of a ``$share/{group}/{filter}`` subscription (else the filter itself)."""
    if not topic_filter.startswith(_SHARE_PREFIX):
        return topic_filter
    group, sep, rest = topic_filter[len(_SHARE_PREFIX) :].partition("/")
    if not group or not sep or not rest or "+" in group or "#" in group:
        raise ValueError(f"topic filter {topic_filter!r}: expected $share/{{group}}/{{filter}}")
    return rest


def _check_common(value: str, what: str) -> None:
    if not value:
        raise ValueError(f"{what} must not be empty")
    if "\x00" in value:
        raise ValueError(f"{what} {value!r} contains a NUL character")
    if len(value.encode("utf-8")) > _MAX_TOPIC_BYTES:
        raise ValueError(f"{what} is longer than {_MAX_TOPIC_BYTES} bytes")
