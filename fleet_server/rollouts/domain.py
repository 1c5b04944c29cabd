"""The vocabulary of staged rollouts: rollout and device states, their transition tables,
and the validated rollout specification.

A rollout moves only along :data:`TRANSITIONS` (an operator's action or the engine's);
a device of a rollout only along :data:`DEVICE_TRANSITIONS`. Anything else is refused
with ``invalid_transition``, so a state in the database always has a known history.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.bundle import is_semver
from fleet_server.domain import NAME_RE, TAG_KEY_RE, TAG_VALUE_MAX
from fleet_server.errors import Conflict
from fleet_server.rollouts.waves import parse_waves


class RolloutState(enum.StrEnum):
    """Where a rollout stands."""

    RUNNING = "running"  # waves start, gates are checked
    PAUSED = "paused"  # by an operator or a gate: nothing new is assigned
    COMPLETED = "completed"  # every wave started and finished (or its dwell passed)
    ABORTED = "aborted"  # stopped; assigned devices keep what they were given
    ROLLING_BACK = "rolling_back"  # devices are being moved back to their previous version
    ROLLED_BACK = "rolled_back"  # every device it assigned was moved back


class Action(enum.StrEnum):
    """What moves a rollout from one state to another."""

    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"
    ROLLBACK = "rollback"
    GATE_BREACH = "gate_breach"
    COMPLETE = "complete"
    REVERTED = "reverted"


S, A = RolloutState, Action

#: (state, action) -> the next state. The only ways a rollout changes state.
TRANSITIONS: dict[tuple[RolloutState, Action], RolloutState] = {
    (S.RUNNING, A.PAUSE): S.PAUSED,
    (S.RUNNING, A.GATE_BREACH): S.PAUSED,
    (S.RUNNING, A.COMPLETE): S.COMPLETED,
    (S.RUNNING, A.ABORT): S.ABORTED,
    (S.RUNNING, A.ROLLBACK): S.ROLLING_BACK,
    (S.PAUSED, A.RESUME): S.RUNNING,
    (S.PAUSED, A.ABORT): S.ABORTED,
    (S.PAUSED, A.ROLLBACK): S.ROLLING_BACK,
    (S.COMPLETED, A.ROLLBACK): S.ROLLING_BACK,
    (S.ABORTED, A.ROLLBACK): S.ROLLING_BACK,
    (S.ROLLING_BACK, A.REVERTED): S.ROLLED_BACK,
}

#: States in which the engine still has work beyond following device events.
ACTIVE = frozenset({S.RUNNING, S.PAUSED, S.ROLLING_BACK})
#: States in which no wave starts again.
ENDED = frozenset({S.COMPLETED, S.ABORTED, S.ROLLED_BACK})


def next_state(state: RolloutState, action: Action) -> RolloutState:
    """The state ``action`` leads to from ``state``.

    Raises:
        Conflict: ``action`` is not allowed in ``state`` (``invalid_transition``).
    """
    try:
        return TRANSITIONS[(state, action)]
    except KeyError:
        raise Conflict(
            f"cannot {action.value} a rollout that is {state.value}", code="invalid_transition"
        ) from None


class DeviceState(enum.StrEnum):
    """Where one device stands in one rollout."""

    PENDING = "pending"  # its wave has not started
    ASSIGNED = "assigned"  # the director names the new version; nothing heard yet
    UPDATING = "updating"  # downloading, verifying, validating or activating
    PROBATION = "probation"  # serving the new version, on probation
    COMMITTED = "committed"  # the device committed the new version
    FAILED = "failed"  # failed or rolled back on the device
    STALLED = "stalled"  # no verdict within the rollout's probation window
    SUPERSEDED = "superseded"  # a newer rollout assigned this device the same model
    PINNED = "pinned"  # an operator's pin overrides the rollout
    REVERTED = "reverted"  # moved back to the version it had before
    CANCELLED = "cancelled"  # the rollout ended before the device's wave started
    SKIPPED = "skipped"  # the release has no variant for the device's profile


D = DeviceState
#: The device still runs (or is to run) this rollout's assignment.
HOLDING = frozenset({D.ASSIGNED, D.UPDATING, D.PROBATION, D.COMMITTED, D.FAILED, D.STALLED})
#: Not decided yet: a wave with such devices is not finished.
OPEN = frozenset({D.PENDING, D.ASSIGNED, D.UPDATING, D.PROBATION})
#: Outcomes the failure gate counts.
FAILURES = frozenset({D.FAILED, D.STALLED})
OUTCOMES = FAILURES | {D.COMMITTED}

_CHANGED_HANDS = {D.SUPERSEDED, D.PINNED, D.REVERTED}

#: state -> the states it may move to. Update events move a device among the HOLDING
#: states (the newest event wins: a failed device may retry and then commit).
DEVICE_TRANSITIONS: dict[DeviceState, frozenset[DeviceState]] = {
    D.PENDING: frozenset({D.ASSIGNED, D.COMMITTED, D.SUPERSEDED, D.PINNED, D.CANCELLED}),
    D.ASSIGNED: frozenset({D.UPDATING, D.PROBATION, D.COMMITTED, D.FAILED, *_CHANGED_HANDS}),
    D.UPDATING: frozenset({D.PROBATION, D.COMMITTED, D.FAILED, *_CHANGED_HANDS}),
    D.PROBATION: frozenset({D.UPDATING, D.COMMITTED, D.FAILED, D.STALLED, *_CHANGED_HANDS}),
    D.COMMITTED: frozenset({D.UPDATING, D.PROBATION, D.FAILED, *_CHANGED_HANDS}),
    D.FAILED: frozenset({D.UPDATING, D.PROBATION, D.COMMITTED, *_CHANGED_HANDS}),
    D.STALLED: frozenset({D.UPDATING, D.PROBATION, D.COMMITTED, D.FAILED, *_CHANGED_HANDS}),
    D.SUPERSEDED: frozenset(),
    D.PINNED: frozenset(),
    D.REVERTED: frozenset(),
    D.CANCELLED: frozenset(),
    D.SKIPPED: frozenset(),
}

#: An update event's state -> the device's state in the rollout.
EVENT_STATES: dict[str, DeviceState] = {
    "downloading": D.UPDATING,
    "verifying": D.UPDATING,
    "validating": D.UPDATING,
    "activating": D.UPDATING,
    "probation": D.PROBATION,
    "committed": D.COMMITTED,
    "failed": D.FAILED,
    "rolled_back": D.FAILED,
}


def device_may_move(current: DeviceState, new: DeviceState) -> bool:
    """True when a device of a rollout may go from ``current`` to ``new``."""
    return new in DEVICE_TRANSITIONS[current]


# --- the specification ------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Target(_Strict):
    """Which devices a rollout is for: every condition given must hold."""

    tags: dict[str, str] = Field(default_factory=dict)
    profile: str | None = Field(default=None, max_length=128)
    devices: list[str] = Field(default_factory=list, max_length=10_000)
    #: Required to target the whole fleet (no other condition), so it is never an accident.
    all_devices: bool = False

    @field_validator("tags")
    @classmethod
    def _tags(cls, tags: dict[str, str]) -> dict[str, str]:
        for key, value in tags.items():
            if not TAG_KEY_RE.match(key) or len(value) > TAG_VALUE_MAX:
                raise ValueError(f"bad tag {key}={value}")
        return tags

    @field_validator("devices")
    @classmethod
    def _devices(cls, devices: list[str]) -> list[str]:
        bad = [d for d in devices if not NAME_RE.match(d)]
        if bad:
            raise ValueError(f"bad device id {bad[0]!r}")
        return sorted(set(devices))

    @model_validator(mode="after")
    def _something(self) -> Target:
        empty = not (self.tags or self.profile or self.devices)
        if empty and not self.all_devices:
            raise ValueError("name tags, a profile or devices (or all_devices: true)")
        if self.all_devices and not empty:
            raise ValueError("all_devices cannot be combined with other conditions")
        return self


class FailureGate(_Strict):
    """Pause when more than ``max_ratio`` of the decided devices failed, once at least
    ``min_devices`` are decided (in the current wave, or in the rollout so far)."""

    max_ratio: float = Field(default=0.05, ge=0.0, lt=1.0)
    min_devices: int = Field(default=3, ge=1)


class LatencyGate(_Strict):
    """Pause when the devices' median latency p95 after the update exceeds the one before
    by more than ``max_regression`` (0.2 = 20 %), once ``min_devices`` have both."""

    max_regression: float = Field(default=0.2, gt=0.0)
    min_devices: int = Field(default=3, ge=1)
    #: Telemetry this long before and after the swap is compared.
    window_s: int = Field(default=600, ge=10, le=86_400)


class Gates(_Strict):
    """The health gates of a rollout (``None``: that gate is off)."""

    failure: FailureGate | None = FailureGate()
    latency: LatencyGate | None = None


class RolloutSpec(_Strict):
    """What an operator asks for: ``rollout create``'s flags, the API's body."""

    model: str = Field(pattern=NAME_RE.pattern)
    version: str = Field(min_length=1, max_length=64)
    #: profile -> variant (``*``: every other profile). Empty: per device, the variant
    #: named ``default`` if built for its profile, else the only one built for it.
    variants: dict[str, str] = Field(default_factory=dict)
    target: Target
    waves: list[str] = Field(default_factory=lambda: ["1", "10%", "50%", "100%"])
    #: A wave whose devices are not all done after this long is left behind.
    dwell_s: int = Field(default=1800, ge=0, le=30 * 86_400)
    #: How long after a device reports ``probation`` the server waits for its verdict;
    #: past it the device counts as ``stalled`` (a failure). Keep it above the agents'
    #: own ``updates.probation_s``.
    probation_s: int = Field(default=1200, ge=1, le=30 * 86_400)
    gates: Gates = Gates()
    #: On a gate breach, also move the wave's devices back to their previous version.
    auto_rollback: bool = False

    @field_validator("version")
    @classmethod
    def _semver(cls, version: str) -> str:
        if not is_semver(version):
            raise ValueError(f"{version!r} is not a semantic version")
        return version

    @field_validator("waves", mode="before")
    @classmethod
    def _waves(cls, value: Any) -> list[str]:
        text = ",".join(value) if isinstance(value, list | tuple) else str(value)
        return [str(w) for w in parse_waves(text)]

    @field_validator("variants")
    @classmethod
    def _variants(cls, variants: dict[str, str]) -> dict[str, str]:
        for profile, variant in variants.items():
            if profile != "*" and not NAME_RE.match(profile):
                raise ValueError(f"bad profile {profile!r}")
            if not NAME_RE.match(variant):
                raise ValueError(f"bad variant {variant!r}")
        return variants


# --- what the store returns -------------------------------------------------------------


class Reason(_Strict):
    """Why something is in its state: a code and one sentence."""

    code: str
    message: str

    @classmethod
    def of(cls, code: str, message: str) -> dict[str, Any]:
        """The JSON form stored in the database."""
        return cls(code=code, message=message).model_dump()


class WaveProgress(_Strict):
    """One wave: its size and how many of its devices are in each state."""

    index: int
    size: int
    started: bool
    counts: dict[DeviceState, int]

    @property
    def done(self) -> int:
        """Devices with a final answer (everything but pending and in-flight)."""
        return self.size - sum(self.counts.get(s, 0) for s in OPEN)


class RolloutView(_Strict):
    """A rollout as read from the database."""

    id: int
    model: str
    version: str
    variants: dict[str, str]
    target: Target
    waves: list[str]
    wave_sizes: list[int]
    dwell_s: int
    probation_s: int
    gates: Gates
    auto_rollback: bool
    state: RolloutState
    reason: Reason | None
    current_wave: int
    wave_started_at: datetime | None
    created_at: datetime
    created_by: str
    updated_at: datetime
    finished_at: datetime | None
