"""Jittered exponential backoff between reconnection attempts.

The n-th consecutive failure waits ``base = min(max_s, min_s * 2**n)`` scaled by a
random factor in [0.5, 1.0] ("equal jitter"): a fleet that lost its broker at the same
moment does not come back in lockstep, and no delay is ever shorter than ``min_s / 2``,
so a broker that accepts and at once drops a client never sees a tight loop.
"""

from __future__ import annotations

import random


class Backoff:
    """Delays for consecutive failed attempts; :meth:`reset` after a stable connection."""

    def __init__(self, min_s: float, max_s: float, rng: random.Random | None = None) -> None:
        """Raises ValueError unless ``0 < min_s <= max_s``."""
        if not 0 < min_s <= max_s:
            raise ValueError(f"backoff needs 0 < min_s <= max_s, got {min_s}, {max_s}")
        self.min_s = min_s
        self.max_s = max_s
        self._rng = rng or random.Random()
        self._failures = 0

    @property
    def failures(self) -> int:
        """Consecutive failures since the last :meth:`reset`."""
        return self._failures

    def next_delay(self) -> float:
        """The delay before the next attempt, in seconds; counts one more failure."""
        base = min(self.max_s, self.min_s * 2.0 ** min(self._failures, 62))
        self._failures += 1
        return base * (0.5 + 0.5 * self._rng.random())

    def reset(self) -> None:
        """Start again from ``min_s`` (call after a connection that stayed up)."""
        self._failures = 0
