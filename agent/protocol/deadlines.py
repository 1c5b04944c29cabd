"""Request deadlines: ``parameters.deadline_ms`` and the MQTT 5 Message Expiry Interval.

Both count from the moment the agent received the request; when both are set the
earlier deadline applies. Deadlines are points on one monotonic clock (the caller's,
usually ``time.monotonic()``), in seconds.
"""

from __future__ import annotations


def request_deadline(
    received_at: float, *, deadline_ms: float | None = None, expiry_interval_s: float | None = None
) -> float | None:
    """The deadline of a request received at ``received_at``, or ``None`` when it has none.

    ``expiry_interval_s`` is the Message Expiry Interval as delivered (the broker has
    already taken off the time the message spent queued there). Negative values count
    as zero: the request is already late.
    """
    candidates = [
        received_at + max(0.0, limit) * scale
        for limit, scale in ((deadline_ms, 1e-3), (expiry_interval_s, 1.0))
        if limit is not None
    ]
    return min(candidates) if candidates else None


def deadline_passed(deadline: float | None, now: float) -> bool:
    """True when ``deadline`` is set and ``now`` is at or past it."""
    return deadline is not None and now >= deadline


def remaining_ms(deadline: float | None, now: float) -> float | None:
    """Milliseconds left before ``deadline`` (negative once past it), ``None`` without one."""
    return None if deadline is None else (deadline - now) * 1e3
