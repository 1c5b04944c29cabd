"""Health gates: conditions a running rollout must keep, judged at every tick.

A gate is built from the rollout's :class:`~fleet_server.rollouts.domain.Gates` by a
factory in :data:`REGISTRY` (add one with :func:`register`) and answers a
:class:`Verdict` for a :class:`GateContext`. A breached verdict pauses the rollout, its
message becomes the pause reason.

- ``failure``: the devices that failed (``failed``, ``rolled_back`` on the device, or
  ``stalled``) over those decided (those plus ``committed``), in the current wave and in
  the rollout so far; each is judged once it has ``min_devices`` decided devices. The
  rollout-wide count catches a canary wave too small to be judged alone; the per-wave
  count catches a late wave that the earlier successes would dilute. Waived failures
  (``resume --force``) are not counted.
- ``latency``: per device serving the new version, the mean telemetry p95 in a window
  after the swap over the one before; breached when the median of those ratios exceeds
  ``1 + max_regression`` over at least ``min_devices`` devices.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from fleet_server.rollouts.domain import FailureGate, Gates, LatencyGate, RolloutView

#: (device, p95 before, p95 after) of the devices the latency gate may judge.
LatencyPairs = list[tuple[str, float, float]]


@dataclass(frozen=True)
class Outcomes:
    """Decided devices and, among them, failed ones."""

    decided: int = 0
    failed: int = 0

    @property
    def ratio(self) -> float:
        return self.failed / self.decided if self.decided else 0.0


@dataclass(frozen=True)
class GateContext:
    """What a gate judges: the rollout, its current wave's and overall outcomes, and a
    lazy reader of the latency pairs (a query; only the latency gate calls it)."""

    rollout: RolloutView
    wave: int
    wave_outcomes: Outcomes
    rollout_outcomes: Outcomes
    latency: Callable[[LatencyGate], LatencyPairs]


@dataclass(frozen=True)
class Verdict:
    """One gate's answer: breached or not, with a code and a sentence either way."""

    gate: str
    breached: bool
    code: str
    message: str


class Gate(Protocol):
    """A health condition of a rollout."""

    @property
    def name(self) -> str:
        """The gate's name in verdicts and pause reasons."""
        ...

    def evaluate(self, ctx: GateContext) -> Verdict:
        """Judge the rollout now. Must not raise for missing data: answer not breached."""
        ...


GateFactory = Callable[[Gates], "Gate | None"]
REGISTRY: dict[str, GateFactory] = {}


def register(name: str) -> Callable[[GateFactory], GateFactory]:
    """Register a gate factory under ``name`` (it returns ``None`` when the gate is off)."""

    def add(factory: GateFactory) -> GateFactory:
        REGISTRY[name] = factory
        return factory

    return add


def _pct(x: float) -> str:
    return f"{x:.0%}" if x * 100 == round(x * 100) else f"{x:.1%}"


@dataclass(frozen=True)
class FailureRatioGate:
    """Too many failures among the decided devices (see the module docstring)."""

    spec: FailureGate
    name: str = "failure"

    def _judge(self, scope: str, o: Outcomes) -> Verdict:
        s = self.spec
        counted = f"{scope}: {o.failed} of {o.decided} decided devices failed"
        if o.decided < s.min_devices:
            msg = f"{counted} (judged from {s.min_devices})"
            return Verdict(self.name, False, "sample_too_small", msg)
        if o.ratio > s.max_ratio:
            msg = f"{counted} ({_pct(o.ratio)} > {_pct(s.max_ratio)})"
            return Verdict(self.name, True, "failure_ratio", msg)
        return Verdict(self.name, False, "ok", f"{counted} ({_pct(o.ratio)})")

    def evaluate(self, ctx: GateContext) -> Verdict:
        wave = self._judge(f"wave {ctx.wave + 1}", ctx.wave_outcomes)
        if wave.breached:
            return wave
        overall = self._judge("rollout", ctx.rollout_outcomes)
        return overall if overall.breached or wave.code == "sample_too_small" else wave


@dataclass(frozen=True)
class LatencyRegressionGate:
    """The new version is slower than the old one on the same devices."""

    spec: LatencyGate
    name: str = "latency"

    def evaluate(self, ctx: GateContext) -> Verdict:
        s = self.spec
        pairs = ctx.latency(s)
        if len(pairs) < s.min_devices:
            msg = f"latency p95 known before and after on {len(pairs)} devices"
            return Verdict(
                self.name, False, "sample_too_small", f"{msg} (judged from {s.min_devices})"
            )
        change = statistics.median(after / before - 1.0 for _, before, after in pairs)
        counted = f"median latency p95 change {change:+.0%} on {len(pairs)} devices"
        if change > s.max_regression:
            msg = f"{counted} (> +{_pct(s.max_regression)})"
            return Verdict(self.name, True, "latency_regression", msg)
        return Verdict(self.name, False, "ok", counted)


@register("failure")
def _failure(gates: Gates) -> Gate | None:
    return FailureRatioGate(gates.failure) if gates.failure is not None else None


@register("latency")
def _latency(gates: Gates) -> Gate | None:
    return LatencyRegressionGate(gates.latency) if gates.latency is not None else None


def evaluate(gates: Gates, ctx: GateContext) -> list[Verdict]:
    """Every enabled gate's verdict, in registry order."""
    built = (factory(gates) for factory in REGISTRY.values())
    return [gate.evaluate(ctx) for gate in built if gate is not None]


def first_breach(verdicts: list[Verdict]) -> Verdict | None:
    """The first breached verdict, or ``None``."""
    return next((v for v in verdicts if v.breached), None)
