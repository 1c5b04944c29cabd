"""A fast, thread-safe latency histogram with log-linear (HDR-style) buckets.

Values are milliseconds, bucketed in microseconds. Each power of two from 1 µs up to
2**26 µs (about 67 s) is split into :data:`SUB_BUCKETS` equal buckets, so a bucket is
at most 1/32 of its lower bound wide. A percentile is reported as the middle of its
bucket, clamped to the smallest and largest value recorded: its relative error is at
most 1/64 (about 1.6 %). Values below 1 µs count in the first bucket, values above
the range in the last one (whose percentiles are then the true maximum).

:meth:`LatencyHistogram.record` computes the bucket with :func:`math.frexp` and
increments a list slot under a lock: about a microsecond in CPython.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

#: Buckets per power of two (a power of two itself).
SUB_BUCKETS = 32
#: Powers of two covered: 1 µs .. 2**26 µs (67.1 s).
OCTAVES = 26
#: Number of buckets.
BUCKETS = SUB_BUCKETS * OCTAVES
#: The largest relative error of a reported percentile.
RELATIVE_ERROR = 1 / (2 * SUB_BUCKETS)

_US_PER_MS = 1000.0


def bucket_index(value_ms: float) -> int:
    """The bucket that counts ``value_ms`` (NaN and values below 1 µs: bucket 0)."""
    value_us = value_ms * _US_PER_MS
    if not value_us >= 1.0:  # also catches NaN
        return 0
    mantissa, exponent = math.frexp(value_us)  # value = mantissa * 2**exponent, mantissa in [.5, 1)
    index = (exponent - 1) * SUB_BUCKETS + int((mantissa - 0.5) * (2 * SUB_BUCKETS))
    return index if index < BUCKETS else BUCKETS - 1


def bucket_bounds_ms(index: int) -> tuple[float, float]:
    """The ``[lower, upper)`` bounds of bucket ``index``, in milliseconds."""
    octave, sub = divmod(index, SUB_BUCKETS)
    base = 2.0**octave / _US_PER_MS
    return base * (1 + sub / SUB_BUCKETS), base * (1 + (sub + 1) / SUB_BUCKETS)


def _midpoint_ms(index: int) -> float:
    lower, upper = bucket_bounds_ms(index)
    return (lower + upper) / 2


#: The representative value (middle) of each bucket, in milliseconds.
_MIDPOINTS_MS: tuple[float, ...] = tuple(_midpoint_ms(i) for i in range(BUCKETS))


@dataclass(frozen=True, slots=True)
class HistogramSnapshot:
    """An immutable copy of a histogram: bucket counts plus count, sum, min and max."""

    counts: tuple[int, ...]
    count: int
    sum_ms: float
    min_ms: float
    max_ms: float

    @classmethod
    def empty(cls) -> HistogramSnapshot:
        """A snapshot with nothing recorded."""
        return cls((0,) * BUCKETS, 0, 0.0, math.inf, -math.inf)

    def merge(self, other: HistogramSnapshot) -> HistogramSnapshot:
        """The snapshot of both histograms' values together."""
        if other.count == 0:
            return self
        if self.count == 0:
            return other
        return HistogramSnapshot(
            tuple(a + b for a, b in zip(self.counts, other.counts, strict=True)),
            self.count + other.count,
            self.sum_ms + other.sum_ms,
            min(self.min_ms, other.min_ms),
            max(self.max_ms, other.max_ms),
        )

    def percentile(self, p: float) -> float | None:
        """The ``p``-th percentile (nearest rank), in milliseconds; ``None`` when empty.

        Raises:
            ValueError: ``p`` is outside 0..100.
        """
        return self.percentiles([p])[0]

    def percentiles(self, ps: Sequence[float]) -> list[float | None]:
        """The percentiles ``ps`` (each 0..100, nearest rank), in milliseconds.

        Each is the middle of the bucket holding that rank, clamped to the recorded
        minimum and maximum; the first and last ranks are the exact minimum and maximum,
        and so is a rank in the overflow bucket. ``None`` for every ``p`` when nothing
        was recorded.

        Raises:
            ValueError: a ``p`` outside 0..100.
        """
        for p in ps:
            if not 0.0 <= p <= 100.0:
                raise ValueError(f"percentile {p} is outside 0..100")
        if self.count == 0:
            return [None] * len(ps)
        # Nearest rank: the smallest value with at least p% of the values at or below it.
        ranks = [max(1, math.ceil(p / 100.0 * self.count)) for p in ps]
        wanted = sorted(set(ranks))
        found: dict[int, float] = {}
        cumulative = 0
        position = 0
        for index, n in enumerate(self.counts):
            if not n:
                continue
            cumulative += n
            value = self.max_ms if index == BUCKETS - 1 else _MIDPOINTS_MS[index]
            while position < len(wanted) and wanted[position] <= cumulative:
                found[wanted[position]] = value
                position += 1
            if position == len(wanted):
                break
        # The extremes are known exactly; the last bucket also holds everything above the
        # range, so its middle means nothing: report the true maximum there.
        found[1] = self.min_ms
        found[self.count] = self.max_ms
        return [min(max(found[r], self.min_ms), self.max_ms) for r in ranks]

    def cumulative_counts(self, upper_bounds_ms: Iterable[float]) -> list[int]:
        """For each bound, how many values fell at or below it (Prometheus ``le`` buckets).

        A bucket counts below a bound when its middle does, so the split is as exact as
        the buckets are (within :data:`RELATIVE_ERROR` of the bound).
        """
        out: list[int] = []
        cumulative = 0
        index = 0
        for bound in sorted(upper_bounds_ms):
            while index < BUCKETS and _MIDPOINTS_MS[index] <= bound:
                cumulative += self.counts[index]
                index += 1
            out.append(cumulative)
        return out


class LatencyHistogram:
    """A latency histogram that any thread may record into.

    :meth:`swap` takes what was recorded and starts afresh, atomically: a value recorded
    concurrently lands in exactly one of the two intervals.
    """

    __slots__ = ("_count", "_counts", "_lock", "_max", "_min", "_sum")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = [0] * BUCKETS
        self._count = 0
        self._sum = 0.0
        self._min = math.inf
        self._max = -math.inf

    def record(self, value_ms: float) -> None:
        """Count one latency of ``value_ms`` milliseconds (negative or NaN counts as 0)."""
        # bucket_index(), inlined: this is the hot path.
        if value_ms >= 0.001:
            mantissa, exponent = math.frexp(value_ms * _US_PER_MS)
            index = (exponent - 1) * SUB_BUCKETS + int((mantissa - 0.5) * (2 * SUB_BUCKETS))
            if index >= BUCKETS:
                index = BUCKETS - 1
        else:
            index = 0
            if not value_ms >= 0.0:  # negative or NaN
                value_ms = 0.0
        with self._lock:
            self._counts[index] += 1
            self._count += 1
            self._sum += value_ms
            if value_ms < self._min:  # noqa: PLR1730 (a call to min() costs more)
                self._min = value_ms
            if value_ms > self._max:  # noqa: PLR1730
                self._max = value_ms

    @property
    def count(self) -> int:
        """How many values were recorded since the last :meth:`swap` or :meth:`reset`."""
        with self._lock:
            return self._count

    def snapshot(self) -> HistogramSnapshot:
        """A copy of what was recorded so far; the histogram is left as it is."""
        with self._lock:
            return HistogramSnapshot(
                tuple(self._counts), self._count, self._sum, self._min, self._max
            )

    def swap(self) -> HistogramSnapshot:
        """Take what was recorded and start a new, empty interval, atomically."""
        fresh = [0] * BUCKETS
        with self._lock:
            counts, self._counts = self._counts, fresh
            count, total, low, high = self._count, self._sum, self._min, self._max
            self._count, self._sum, self._min, self._max = 0, 0.0, math.inf, -math.inf
        return HistogramSnapshot(tuple(counts), count, total, low, high)

    def reset(self) -> None:
        """Forget everything recorded."""
        self.swap()

    def percentiles(self, ps: Sequence[float]) -> list[float | None]:
        """The percentiles ``ps`` of what was recorded so far (see :class:`HistogramSnapshot`).

        Raises:
            ValueError: a ``p`` outside 0..100.
        """
        return self.snapshot().percentiles(ps)
