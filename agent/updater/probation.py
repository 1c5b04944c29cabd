"""Probation: is the new model at least as healthy as the one it replaced?

Both sides come from the agent's own per-model counters (:class:`~agent.telemetry.ModelStats`,
the numbers telemetry reports), read as two windows of one cumulative series:

* the **baseline**: from when the old model began serving (the updater's start, or the end
  of the last update) to when this update began (its download: the download and the
  validation load the CPU, which is no fault of the old model);
* the **probation window**: from the swap to now.

A request counts when it was answered with outputs or with an error the model can cause
(:data:`HEALTH_ERROR_CODES`); a request refused for reasons that have nothing to do with
the model (a malformed payload, a model still loading) does not. The new model breaches
when, with at least ``probation_min_requests`` requests answered:

* its error rate exceeds the baseline's by more than ``max_error_rate_increase``, or
* its latency p95 exceeds ``max_latency_ratio`` times the baseline's AND is more than
  ``min_latency_regression_ms`` slower in absolute terms (compared only when the baseline
  has as many requests too). The floor keeps scheduling noise on a sub-millisecond model
  (0.6 ms becoming 2 ms on a busy CPU) from rolling back a healthy update.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from agent.errors import UpdateError
from agent.telemetry.histogram import BUCKETS, HistogramSnapshot, bucket_bounds_ms
from agent.telemetry.stats import StatsSnapshot
from agent.updater.config import UpdateConfig

#: Errors that a model can cause: failures while running, NaN/Inf outputs (``internal``),
#: inputs it no longer accepts, and slowness (a queue that overflows, deadlines missed).
HEALTH_ERROR_CODES = frozenset({"internal", "bad_input", "overloaded", "deadline_exceeded"})


class ProbationFailed(UpdateError):
    """The new model did worse than the old one during probation."""

    code = "probation_failed"


def _minus(later: HistogramSnapshot, earlier: HistogramSnapshot) -> HistogramSnapshot:
    """The values recorded between two cumulative snapshots (min/max to bucket precision)."""
    counts = tuple(max(0, b - a) for a, b in zip(earlier.counts, later.counts, strict=True))
    count = sum(counts)
    if count == 0:
        return HistogramSnapshot.empty()
    used = [i for i, n in enumerate(counts) if n]
    low = bucket_bounds_ms(used[0])[0]
    high = later.max_ms if used[-1] == BUCKETS - 1 else bucket_bounds_ms(used[-1])[1]
    return HistogramSnapshot(counts, count, max(0.0, later.sum_ms - earlier.sum_ms), low, high)


@dataclass(frozen=True)
class Window:
    """What one model answered between two readings of its counters."""

    ok: int
    errors: int
    latency: HistogramSnapshot

    @classmethod
    def between(cls, earlier: StatsSnapshot, later: StatsSnapshot) -> Window:
        latency = _minus(later.latency, earlier.latency)
        errors = sum(
            max(0, later.errors_total.get(code, 0) - earlier.errors_total.get(code, 0))
            for code in HEALTH_ERROR_CODES
        )
        return cls(latency.count, errors, latency)

    @property
    def requests(self) -> int:
        return self.ok + self.errors

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0

    @property
    def p95_ms(self) -> float | None:
        return self.latency.percentile(95.0)


def judge(baseline: Window, current: Window, config: UpdateConfig) -> ProbationFailed | None:
    """The breach of ``current`` against ``baseline``, or None (healthy, or too few requests)."""
    enough = config.probation_min_requests
    if current.requests < enough:
        return None
    allowed = baseline.error_rate + config.max_error_rate_increase
    if current.error_rate > allowed:
        return ProbationFailed(
            f"error rate {current.error_rate:.1%} over {current.requests} requests, against "
            f"{baseline.error_rate:.1%} before (at most {allowed:.1%} allowed)",
            code="error_rate_regression",
        )
    new_p95, old_p95 = current.p95_ms, baseline.p95_ms
    if current.ok >= enough and baseline.ok >= enough and new_p95 is not None and old_p95:
        ratio = new_p95 / old_p95
        slower_ms = new_p95 - old_p95
        too_slow = not math.isfinite(ratio) or ratio > config.max_latency_ratio
        if too_slow and slower_ms > config.min_latency_regression_ms:
            return ProbationFailed(
                f"latency p95 {new_p95:.2f} ms, {ratio:.1f}x the old model's {old_p95:.2f} ms "
                f"(at most {config.max_latency_ratio:g}x, or "
                f"{config.min_latency_regression_ms:g} ms slower, allowed)",
                code="latency_regression",
            )
    return None
