"""What operators do to rollouts and devices (the API's and CLI's verbs), each in the
caller's write transaction, audited, and checked against the transition table.

- ``create``: plan the target into waves; the engine's next tick starts the first wave.
- ``pause`` / ``resume``: nothing new is assigned while paused; devices already assigned
  carry on. ``resume`` restarts the current wave's dwell time; ``force`` also waives the
  failures counted so far (gates stop counting them), to continue past a gate.
- ``abort``: stop where it is. Devices not yet assigned are cancelled; assigned devices
  keep the new version (use ``rollback`` to move them back).
- ``rollback``: cancel what is not assigned; the engine then gives every assigned device
  back what it ran before, a batch per tick, and ends ``rolled_back``.
- ``pin`` / ``unpin``: a pin makes a device run one version whatever rollouts say
  (rollouts mark the device ``pinned``). Unpinning changes nothing on the device; a
  rollout that has not reached it yet, or a new one, updates it later.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session

from fleet_server.domain import as_utc
from fleet_server.errors import NotFound, ValidationError
from fleet_server.rollouts.domain import (
    FAILURES,
    Action,
    DeviceState,
    Reason,
    RolloutSpec,
    RolloutState,
    RolloutView,
    next_state,
)
from fleet_server.rollouts.planner import choose_variant, plan
from fleet_server.store import assignments, audit, releases, rollouts
from fleet_server.store import rollout_devices as devs
from fleet_server.store.assignments import Desired, Pin
from fleet_server.store.models import DeviceRow
from fleet_server.store.rollout_models import RolloutRow


def create(
    session: Session, spec: RolloutSpec, *, actor: str, now: datetime, stale_after: timedelta
) -> RolloutView:
    """Plan and store a rollout (``running``; the engine starts its first wave).

    Raises:
        NotFound: the release does not exist.
        ValidationError: see :func:`fleet_server.rollouts.planner.plan`.
    """
    devices, sizes = plan(session, spec, now=now, stale_after=stale_after)
    row = rollouts.insert_rollout(session, spec, devices, sizes, actor=actor, now=now)
    skipped = sum(1 for d in devices if d.state is DeviceState.SKIPPED)
    audit.record(
        session,
        actor=actor,
        action="rollout.create",
        target_type="rollout",
        target_id=str(row.id),
        after={**spec.model_dump(mode="json"), "wave_sizes": sizes, "skipped": skipped},
    )
    return rollouts.view(row)


def _act(
    session: Session,
    rollout_id: int,
    action: Action,
    *,
    actor: str,
    now: datetime,
    reason: dict[str, Any] | None,
    extra: dict[str, Any] | None = None,
) -> RolloutRow:
    row = rollouts.lock_rollout(session, rollout_id)
    before = row.state
    row.state = next_state(RolloutState(row.state), action).value
    row.reason, row.updated_at = reason, now
    audit.record(
        session,
        actor=actor,
        action=f"rollout.{action.value}",
        target_type="rollout",
        target_id=str(rollout_id),
        before={"state": before},
        after={"state": row.state, **(extra or {})},
    )
    return row


def pause(session: Session, rollout_id: int, *, actor: str, now: datetime) -> RolloutView:
    """Pause a running rollout.

    Raises:
        NotFound: no such rollout.
        Conflict: it is not running (``invalid_transition``).
    """
    reason = Reason.of("paused", f"paused by {actor}")
    return rollouts.view(
        _act(session, rollout_id, Action.PAUSE, actor=actor, now=now, reason=reason)
    )


def resume(
    session: Session, rollout_id: int, *, actor: str, now: datetime, force: bool = False
) -> RolloutView:
    """Resume a paused rollout; ``force`` waives the failures counted so far.

    Raises:
        NotFound: no such rollout.
        Conflict: it is not paused (``invalid_transition``).
    """
    row = rollouts.lock_rollout(session, rollout_id)
    next_state(RolloutState(row.state), Action.RESUME)  # refuse before changing anything
    waived = devs.waive(session, rollout_id, FAILURES) if force else 0
    row = _act(
        session,
        rollout_id,
        Action.RESUME,
        actor=actor,
        now=now,
        reason=None,
        extra={"force": force, "waived": waived},
    )
    if row.current_wave >= 0:
        row.wave_started_at = now
    return rollouts.view(row)


def abort(session: Session, rollout_id: int, *, actor: str, now: datetime) -> RolloutView:
    """Stop a running or paused rollout; its unassigned devices are cancelled.

    Raises:
        NotFound: no such rollout.
        Conflict: it has ended (``invalid_transition``).
    """
    reason = Reason.of("aborted", f"aborted by {actor}")
    row = _act(session, rollout_id, Action.ABORT, actor=actor, now=now, reason=reason)
    pending = frozenset({DeviceState.PENDING})
    devs.set_state(session, rollout_id, pending, DeviceState.CANCELLED, reason=reason, now=now)
    row.finished_at = now
    row.settled = False
    return rollouts.view(row)


def rollback(session: Session, rollout_id: int, *, actor: str, now: datetime) -> RolloutView:
    """Start moving every device of the rollout back (the engine does it, in batches).

    Raises:
        NotFound: no such rollout.
        Conflict: it is rolling back or rolled back already (``invalid_transition``).
    """
    reason = Reason.of("rollback", f"rollback requested by {actor}")
    row = _act(session, rollout_id, Action.ROLLBACK, actor=actor, now=now, reason=reason)
    pending = frozenset({DeviceState.PENDING})
    devs.set_state(session, rollout_id, pending, DeviceState.CANCELLED, reason=reason, now=now)
    row.finished_at = None
    row.settled = False
    return rollouts.view(row)


# --- pins -----------------------------------------------------------------------------


def _pin_picture(pin: Pin | None) -> dict[str, Any] | None:
    if pin is None:
        return None
    return {"model": pin.model, "version": pin.version, "variant": pin.variant}


def pin(
    session: Session,
    device_id: str,
    model: str,
    version: str,
    *,
    variant: str | None = None,
    actor: str,
    now: datetime,
) -> Pin:
    """Pin the device to ``model`` ``version`` (the variant for its profile unless given)
    and make that its desired model; audited.

    Raises:
        NotFound: no such device, or no such release.
        ValidationError: no variant of the release fits the device (``no_variant``).
    """
    device = session.get(DeviceRow, device_id)
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    release = releases.get_release(session, model, version)
    chosen, why = choose_variant(release, device.profile, {"*": variant} if variant else {})
    if chosen is None:
        raise ValidationError(f"cannot pin {device_id}: {why}", code="no_variant")
    assignments.lock_device(session, device_id, now)
    before = assignments.pin_of(session, device_id, model)
    new = Pin(device_id, model, version, chosen, as_utc(now), actor)
    assignments.put_pin(session, new)
    assignments.set_desired(session, device_id, model, Desired(version, chosen, None), now)
    audit.record(
        session,
        actor=actor,
        action="device.pin",
        target_type="device",
        target_id=device_id,
        before=_pin_picture(before),
        after=_pin_picture(new),
    )
    return new


def unpin(session: Session, device_id: str, model: str, *, actor: str, now: datetime) -> Pin:
    """Remove the device's pin of ``model`` (what it runs does not change); audited.

    Raises:
        NotFound: no such device, or it has no pin for ``model``.
    """
    if session.get(DeviceRow, device_id) is None:
        raise NotFound(f"no device {device_id!r}")
    assignments.lock_device(session, device_id, now)
    before = assignments.pin_of(session, device_id, model)
    if before is None or not assignments.delete_pin(session, device_id, model):
        raise NotFound(f"{device_id} has no pin for {model}")
    audit.record(
        session,
        actor=actor,
        action="device.unpin",
        target_type="device",
        target_id=device_id,
        before=_pin_picture(before),
    )
    return before
