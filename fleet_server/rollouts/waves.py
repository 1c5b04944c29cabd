"""Waves: ``1,10%,50%,100%`` read as cumulative sizes, and the split of a device list.

Each wave names how many of the target devices have the update once it has started: a
count (``1``: one canary) or a percentage of the target (rounded up). So
``1,10%,50%,100%`` over 40 devices gives waves of 1, 3, 16 and 20 devices. The last wave
must be ``100%``, so every targeted device is covered. A wave that adds nobody (10 % of 5
devices after a canary of 1) is dropped when the rollout is planned.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")
_WAVE_RE = re.compile(r"^(?:(\d{1,6})|(\d{1,3}(?:\.\d{1,2})?)%)$")
MAX_WAVES = 20


@dataclass(frozen=True)
class Wave:
    """One wave's cumulative size: a device count, or a percentage of the target."""

    count: int | None = None
    percent: float | None = None

    def reach(self, total: int) -> int:
        """How many of ``total`` devices have the update once this wave has started."""
        if self.count is not None:
            return min(self.count, total)
        assert self.percent is not None
        return min(total, math.ceil(total * self.percent / 100 - 1e-9))

    def __str__(self) -> str:
        if self.count is not None:
            return str(self.count)
        assert self.percent is not None
        return f"{self.percent:g}%"


def parse_waves(text: str) -> list[Wave]:
    """Parse ``1,10%,50%,100%``.

    Raises:
        ValueError: an item is neither a count nor a percentage, a wave is smaller than the
            one before it, there are more than 20, or the last is not ``100%``.
    """
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise ValueError("waves: give at least one wave, e.g. 1,10%,50%,100%")
    if len(items) > MAX_WAVES:
        raise ValueError(f"waves: at most {MAX_WAVES}")
    waves: list[Wave] = []
    for item in items:
        m = _WAVE_RE.match(item)
        if m is None:
            raise ValueError(f"waves: {item!r} is neither a device count nor a percentage")
        if m[1] is not None:
            if int(m[1]) == 0:
                raise ValueError("waves: a wave of 0 devices")
            waves.append(Wave(count=int(m[1])))
        else:
            pct = float(m[2])
            if not 0 < pct <= 100:
                raise ValueError(f"waves: {item} is not in (0%, 100%]")
            waves.append(Wave(percent=pct))
    if waves[-1].percent != 100:
        raise ValueError("waves: the last wave must be 100%, so every device is covered")
    pcts = [w.percent for w in waves if w.percent is not None]
    counts = [w.count for w in waves if w.count is not None]
    if pcts != sorted(pcts) or counts != sorted(counts):
        raise ValueError("waves: each wave must reach at least as far as the one before")
    return waves


def wave_sizes(waves: Sequence[Wave], total: int) -> list[int]:
    """The number of devices each wave adds, empty waves dropped (sums to ``total``)."""
    sizes: list[int] = []
    reached = 0
    for wave in waves:
        upto = max(reached, wave.reach(total))
        if upto > reached:
            sizes.append(upto - reached)
            reached = upto
    if reached < total:  # cannot happen with a final 100%, kept for safety
        sizes.append(total - reached)
    return sizes


def split(items: Sequence[T], sizes: Sequence[int]) -> list[list[T]]:
    """``items`` cut into consecutive groups of ``sizes``."""
    out: list[list[T]] = []
    start = 0
    for size in sizes:
        out.append(list(items[start : start + size]))
        start += size
    return out
