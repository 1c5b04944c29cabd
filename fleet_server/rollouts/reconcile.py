"""One rollout's step of a tick, inside one write transaction holding the rollout's lock.

The step only reads persisted state and writes its consequences, so it can be run again
at any time, by any replica, after any crash:

1. **Follow devices.** New update events of this rollout move its devices along
   :data:`~fleet_server.rollouts.domain.DEVICE_TRANSITIONS` (the newest event of the
   rollout's version wins); devices whose desired model no longer carries this rollout
   are marked ``pinned`` or ``superseded`` (naming the rollout that took them); devices on
   probation past the rollout's probation window become ``stalled``.
2. **Running:** judge the gates (a breach pauses, and with auto-rollback moves the
   current wave back); assign the started waves' pending devices (a batch per tick); start
   the next wave when the current one is done or its dwell time has passed; complete after
   the last. **Rolling back:** move a batch of devices back per tick, then ``rolled_back``.
3. **Ended** rollouts are followed until none of their devices can change any more.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from fleet_server.domain import ModelRelease, as_utc
from fleet_server.errors import NotFound
from fleet_server.rollouts.domain import (
    ENDED,
    EVENT_STATES,
    FAILURES,
    HOLDING,
    OPEN,
    OUTCOMES,
    Action,
    DeviceState,
    LatencyGate,
    Reason,
    RolloutState,
    RolloutView,
    device_may_move,
    next_state,
)
from fleet_server.rollouts.gates import GateContext, LatencyPairs, Outcomes, Verdict, first_breach
from fleet_server.rollouts.gates import evaluate as evaluate_gates
from fleet_server.rollouts.planner import choose_variant
from fleet_server.store import assignments, audit, releases
from fleet_server.store import rollout_devices as devs
from fleet_server.store.assignments import Desired
from fleet_server.store.rollout_models import RolloutDeviceRow, RolloutRow
from fleet_server.store.rollouts import counts, view

ENGINE_ACTOR = "rollout-engine"
_ALL = frozenset(DeviceState)
_FOLLOWED = OPEN | {DeviceState.STALLED}
#: Devices whose events one query reads (bounds the IN list and the rows in memory).
_EVENT_CHUNK = 500


@dataclass
class StepResult:
    """What one step did (summed into the tick's report)."""

    assigned: int = 0
    reverted: int = 0
    waves_started: list[int] = field(default_factory=list)
    paused: Verdict | None = None
    ended: RolloutState | None = None
    #: Work is left that the next step can do at once (a batch size was reached).
    more: bool = False


def outcomes(tally: dict[tuple[int, DeviceState, bool], int], waves: range) -> Outcomes:
    """Decided and failed devices (waived ones left out) of ``waves``."""
    decided = failed = 0
    for (wave, state, waived), n in tally.items():
        if waived or wave not in waves or state not in OUTCOMES:
            continue
        decided += n
        failed += n if state in FAILURES else 0
    return Outcomes(decided, failed)


def judge(session: Session, rollout: RolloutView) -> list[Verdict]:
    """Every enabled gate's verdict on ``rollout`` now (read-only: the API shows it too)."""
    tally = counts(session, rollout.id)
    wave = max(rollout.current_wave, 0)

    def latency(spec: LatencyGate) -> LatencyPairs:
        return devs.latency_pairs(
            session,
            rollout.id,
            rollout.model,
            waves=range(0, wave + 1),
            states=frozenset({DeviceState.PROBATION, DeviceState.COMMITTED}),
            window_s=spec.window_s,
        )

    ctx = GateContext(
        rollout=rollout,
        wave=wave,
        wave_outcomes=outcomes(tally, range(wave, wave + 1)),
        rollout_outcomes=outcomes(tally, range(0, wave + 1)),
        latency=latency,
    )
    return evaluate_gates(rollout.gates, ctx)


class Reconciler:
    """Advances one locked rollout from its persisted state."""

    def __init__(
        self, session: Session, row: RolloutRow, now: datetime, *, batch_size: int
    ) -> None:
        self.s, self.row, self.now, self.batch = session, row, now, batch_size
        self.result = StepResult()
        self._releases: dict[str, ModelRelease | None] = {}

    # --- the step ----------------------------------------------------------------------

    def run(self) -> StepResult:
        """Do this rollout's step (see the module docstring)."""
        self.follow_devices()
        state = RolloutState(self.row.state)
        if state is RolloutState.RUNNING:
            self.advance()
        elif state is RolloutState.ROLLING_BACK:
            self.roll_back_batch()
        if RolloutState(self.row.state) in ENDED:
            settled = devs.count_in(self.s, self.row.id, _FOLLOWED) == 0
            if settled != self.row.settled:
                self.row.settled = settled
        return self.result

    def _move(self, rd: RolloutDeviceRow, new: DeviceState, reason: dict[str, Any] | None) -> None:
        rd.state, rd.reason = new.value, reason
        if new not in OPEN:
            rd.finished_at = self.now

    # --- 1. following devices ------------------------------------------------------------

    def follow_devices(self) -> None:
        """Apply new update events, lost assignments and probation timeouts."""
        row = self.row
        tally = devs.event_tally(self.s, row.id, row.events_watermark)
        if tally.total != row.events_seen:
            if row.events_seen + tally.above == tally.total:
                ids = devs.devices_with_events(self.s, row.id, row.events_watermark, tally.newest)
                self._apply_events(ids)
            else:  # an event below the watermark committed late (concurrent writers)
                self._apply_events(None)
            row.events_seen, row.events_watermark = tally.total, tally.newest
        for lost in devs.lost_devices(self.s, row.id, row.model):
            (rd,) = devs.rows(self.s, row.id, _ALL, device_ids=[lost.device_id])
            self._mark_lost(rd, lost.holder, lost.pinned)
        cutoff = self.now - timedelta(seconds=row.probation_s)
        devs.stall(self.s, row.id, cutoff=cutoff, now=self.now)

    def _apply_events(self, device_ids: list[str] | None) -> None:
        """Apply the newest events of ``device_ids`` (None: of every device), a chunk of
        devices at a time. Only devices with events above the watermark are read, so a
        tick costs what arrived since the last one, not the rollout's size."""
        row = self.row
        if device_ids is None:
            device_ids = sorted(e.device_id for e in devs.latest_events(self.s, row.id, row.model))
        for start in range(0, len(device_ids), _EVENT_CHUNK):
            ids = device_ids[start : start + _EVENT_CHUNK]
            latest = {
                e.device_id: e
                for e in devs.latest_events(self.s, row.id, row.model, device_ids=ids)
            }
            mine = {
                e.device_id: e
                for e in devs.latest_events(self.s, row.id, row.model, row.version, device_ids=ids)
            }
            serving = devs.first_serving(self.s, row.id, row.version, device_ids=ids)
            for rd in devs.rows(self.s, row.id, _ALL, device_ids=sorted(latest)):
                newest = latest[rd.device_id]
                rd.last_event, rd.last_event_ts = newest.state, newest.ts
                self._apply(rd, mine.get(rd.device_id), serving.get(rd.device_id))

    def _apply(
        self, rd: RolloutDeviceRow, event: devs.LatestEvent | None, serving: int | None
    ) -> None:
        if serving is not None and rd.activated_ts is None:
            rd.activated_ts = serving
        if event is None or event.id == rd.last_event_id:
            return
        current, new = DeviceState(rd.state), EVENT_STATES.get(event.state)
        if current not in HOLDING or new is None:
            return
        rd.last_event_id = event.id
        if new is current or not device_may_move(current, new):
            return
        self._move(rd, new, event.reason if new is DeviceState.FAILED else None)
        if new is DeviceState.PROBATION:
            rd.probation_at = event.received_at

    def _mark_lost(self, rd: RolloutDeviceRow, holder: int | None, pinned: str | None) -> None:
        if pinned is not None:
            new, reason = DeviceState.PINNED, Reason.of("pinned", f"pinned to {pinned}")
        elif holder is not None:
            msg = f"rollout {holder} assigned this device {self.row.model}"
            new, reason = DeviceState.SUPERSEDED, Reason.of("superseded", msg)
        else:
            msg = f"the device's {self.row.model} assignment was removed"
            new, reason = DeviceState.SUPERSEDED, Reason.of("assignment_removed", msg)
        if device_may_move(DeviceState(rd.state), new):
            self._move(rd, new, reason)

    # --- 2. running --------------------------------------------------------------------

    def advance(self) -> None:
        """Judge the gates, assign, and start the next wave or complete."""
        row = self.row
        if row.current_wave >= 0:
            breach = first_breach(self.verdicts())
            if breach is not None:
                self._breach(breach)
                return
        if row.current_wave < 0:
            if not row.wave_sizes:
                self._end(Action.COMPLETE, Reason.of("completed", "no device to update"))
                return
            self._start_wave(0)
        if self._assign_pending():
            self.result.more = True
            return  # the started waves are still being assigned (a batch per tick)
        wave = row.current_wave
        started = as_utc(row.wave_started_at) if row.wave_started_at else self.now
        dwell_over = self.now >= started + timedelta(seconds=row.dwell_s)
        if devs.count_in(self.s, row.id, OPEN, wave) and not dwell_over:
            return
        if wave + 1 < len(row.wave_sizes):
            self._start_wave(wave + 1)
            self.result.more = self._assign_pending()
        else:
            self._end(Action.COMPLETE, self._summary())

    def verdicts(self) -> list[Verdict]:
        """Every enabled gate's verdict on the rollout now."""
        return judge(self.s, view(self.row))

    def _breach(self, verdict: Verdict) -> None:
        row = self.row
        message = f"{verdict.gate} gate: {verdict.message}"
        if row.auto_rollback:
            wave = range(row.current_wave, row.current_wave + 1)
            moved = 0
            for rd in devs.rows(self.s, row.id, HOLDING, waves=wave):
                moved += self._revert(rd, Reason.of("auto_rollback", message))
            message += f"; wave {row.current_wave + 1} moved back ({moved} devices)"
        self._transition(Action.GATE_BREACH, Reason.of(verdict.code, message))
        self.result.paused = verdict

    def _start_wave(self, wave: int) -> None:
        row = self.row
        row.current_wave, row.wave_started_at = wave, self.now
        row.updated_at = self.now
        self.result.waves_started.append(wave)
        audit.record(
            self.s,
            actor=ENGINE_ACTOR,
            action="rollout.wave_start",
            target_type="rollout",
            target_id=str(row.id),
            after={"wave": wave + 1, "devices": row.wave_sizes[wave]},
        )

    def _assign_pending(self) -> bool:
        """Assign a batch of the started waves' pending devices; True when some remain.

        The batch is read and written with a few statements in all (not a few per
        device): its devices are locked in id order, their pins, desired and reported
        versions read at once, and the new assignments written at once."""
        row = self.row
        waves = range(0, row.current_wave + 1)
        pending = frozenset({DeviceState.PENDING})
        batch = devs.rows(self.s, row.id, pending, waves=waves, limit=self.batch + 1)
        todo = sorted(batch[: self.batch], key=lambda r: r.device_id)  # one lock order
        if todo:
            ids = [rd.device_id for rd in todo]
            revisions = assignments.lock_devices(self.s, ids, self.now)
            pins = assignments.pins_for(self.s, ids, row.model)
            current = assignments.desired_for(self.s, ids, row.model)
            reported = assignments.reported_versions(self.s, ids, row.model)
            wanted: dict[str, Desired] = {}
            for rd in todo:
                d = rd.device_id
                if self._assign(rd, pins.get(d), current.get(d), reported.get(d)):
                    assert rd.variant is not None  # planned devices always have one
                    wanted[d] = Desired(row.version, rd.variant, row.id)
            assignments.set_desired_many(self.s, row.model, wanted, revisions, self.now)
        return len(batch) > self.batch

    def _assign(
        self,
        rd: RolloutDeviceRow,
        pin: assignments.Pin | None,
        current: Desired | None,
        reported: str | None,
    ) -> bool:
        """Decide one device of the batch; True when it must be assigned this release."""
        row = self.row
        if pin is not None:
            self._mark_lost(rd, None, pin.version)
            return False
        if current is not None and current.rollout_id is not None and current.rollout_id > row.id:
            msg = f"the newer rollout {current.rollout_id} holds this device's {row.model}"
            self._move(rd, DeviceState.SUPERSEDED, Reason.of("superseded", msg))
            return False
        if current is not None:
            rd.prev_version, rd.prev_variant = current.version, current.variant
            rd.prev_rollout_id = current.rollout_id
        else:
            rd.prev_version, rd.prev_variant = self._reported_previous(rd, reported)
        rd.assigned_at = self.now
        if reported == row.version:
            self._move(
                rd,
                DeviceState.COMMITTED,
                Reason.of("already_running", f"already runs {row.version}"),
            )
        else:
            self._move(rd, DeviceState.ASSIGNED, None)
        self.result.assigned += 1
        return True

    def _reported_previous(
        self, rd: RolloutDeviceRow, version: str | None
    ) -> tuple[str | None, str | None]:
        """The release the device reports running (``version``), when the server has it:
        what a rollback goes back to when no desired model was recorded before."""
        if version is None or version == self.row.version:
            return None, None
        if version not in self._releases:
            try:
                self._releases[version] = releases.get_release(self.s, self.row.model, version)
            except NotFound:
                self._releases[version] = None
        release = self._releases[version]
        if release is None:
            return None, None
        variant, _ = choose_variant(release, rd.profile, {})
        return (version, variant) if variant is not None else (None, None)

    def _summary(self) -> dict[str, Any]:
        tally: dict[DeviceState, int] = {}
        for (_, state, _), n in counts(self.s, self.row.id).items():
            tally[state] = tally.get(state, 0) + n
        parts = [f"{n} {state.value}" for state, n in sorted(tally.items()) if n]
        return Reason.of("completed", ", ".join(parts) or "no devices")

    # --- rolling back --------------------------------------------------------------------

    def roll_back_batch(self) -> None:
        """Move a batch of devices back; ``rolled_back`` when none is left."""
        row = self.row
        batch = devs.rows(self.s, row.id, HOLDING, limit=self.batch + 1)
        reason = Reason.of("rolled_back", "the rollout was rolled back")
        for rd in sorted(batch[: self.batch], key=lambda r: r.device_id):
            self._revert(rd, reason)
        self.result.more = len(batch) > self.batch
        if len(batch) <= self.batch:
            self._end(Action.REVERTED, Reason.of("rolled_back", f"{row.model} moved back"))

    def _revert(self, rd: RolloutDeviceRow, reason: dict[str, Any]) -> int:
        """Give the device back what it had before this rollout; 1 when it was moved."""
        row, device = self.row, rd.device_id
        assignments.lock_device(self.s, device, self.now)
        current = assignments.desired_of(self.s, device, row.model)
        if current is None or current.rollout_id != row.id:
            pin = assignments.pin_of(self.s, device, row.model)
            self._mark_lost(
                rd, current.rollout_id if current else None, pin.version if pin else None
            )
            return 0
        previous = None
        if rd.prev_version is not None and rd.prev_variant is not None:
            previous = Desired(rd.prev_version, rd.prev_variant, rd.prev_rollout_id)
        assignments.set_desired(self.s, device, row.model, previous, self.now)
        self._move(rd, DeviceState.REVERTED, reason)
        self.result.reverted += 1
        return 1

    # --- rollout transitions ---------------------------------------------------------------

    def _transition(self, action: Action, reason: dict[str, Any]) -> None:
        row = self.row
        before = row.state
        row.state = next_state(RolloutState(row.state), action).value
        row.reason, row.updated_at = reason, self.now
        audit.record(
            self.s,
            actor=ENGINE_ACTOR,
            action=f"rollout.{action.value}",
            target_type="rollout",
            target_id=str(row.id),
            before={"state": before},
            after={"state": row.state, "reason": reason},
        )

    def _end(self, action: Action, reason: dict[str, Any]) -> None:
        self._transition(action, reason)
        self.row.finished_at = self.now
        self.result.ended = RolloutState(self.row.state)
