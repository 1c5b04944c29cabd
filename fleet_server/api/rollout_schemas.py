"""Request and response bodies of the rollout and pin routes.

The request body of ``POST /api/v1/rollouts`` is
:class:`fleet_server.rollouts.domain.RolloutSpec` itself (unknown fields refused).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fleet_server.domain import NAME_RE
from fleet_server.rollouts.domain import DeviceState, RolloutView, WaveProgress
from fleet_server.rollouts.gates import Verdict
from fleet_server.store.assignments import Pin
from fleet_server.store.rollouts import RolloutDevice


class _In(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WaveOut(BaseModel):
    """One wave (numbered from 1) and its devices by state."""

    wave: int
    size: int
    started: bool
    done: int
    counts: dict[DeviceState, int]

    @classmethod
    def of(cls, w: WaveProgress) -> WaveOut:
        return cls(wave=w.index + 1, size=w.size, started=w.started, done=w.done, counts=w.counts)


class VerdictOut(BaseModel):
    """A health gate's verdict now."""

    gate: str
    breached: bool
    code: str
    message: str

    @classmethod
    def of(cls, v: Verdict) -> VerdictOut:
        return cls(gate=v.gate, breached=v.breached, code=v.code, message=v.message)


class RolloutOut(RolloutView):
    """A rollout with its devices counted by state (``skipped`` ones included)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: int
    totals: dict[DeviceState, int]

    @classmethod
    def of(cls, rollout: RolloutView, totals: dict[DeviceState, int]) -> RolloutOut:
        return cls(**rollout.model_dump(), devices=sum(totals.values()), totals=totals)


class RolloutDetail(RolloutOut):
    """A rollout with its waves and the health gates' verdicts now."""

    waves_progress: list[WaveOut]
    health: list[VerdictOut]


class RolloutPage(BaseModel):
    items: list[RolloutOut]
    next_cursor: str | None


class RolloutDeviceOut(BaseModel):
    device_id: str
    wave: int = Field(description="1-based; 0 for devices never planned into a wave")
    profile: str | None
    variant: str | None
    state: DeviceState
    reason: dict[str, Any] | None
    last_event: str | None
    last_event_ts: datetime | None
    prev_version: str | None
    assigned_at: datetime | None
    finished_at: datetime | None
    waived: bool

    @classmethod
    def of(cls, d: RolloutDevice) -> RolloutDeviceOut:
        data = dict(d.__dict__)
        data["wave"] = d.wave + 1
        return cls(**data)


class RolloutDevicePage(BaseModel):
    items: list[RolloutDeviceOut]
    next_cursor: str | None


class ResumeIn(_In):
    #: Waive the failures counted so far (gates stop counting them) to continue past a gate.
    force: bool = False


class PinIn(_In):
    version: str = Field(min_length=1, max_length=64)
    variant: str | None = Field(default=None, pattern=NAME_RE.pattern)


class PinOut(BaseModel):
    device_id: str
    model: str
    version: str
    variant: str
    created_at: datetime
    created_by: str

    @classmethod
    def of(cls, pin: Pin) -> PinOut:
        return cls(**pin.__dict__)
