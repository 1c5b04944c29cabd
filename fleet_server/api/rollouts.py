"""Rollout routes (create, list, show with progress, devices, pause, resume, abort,
rollback) and device pins. Viewers read; operators change; every change is audited.

The engine's tick does the work (starting waves, assigning, moving devices back); these
routes record the operator's decision under the rollout's lock and return at once.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query, status

from fleet_server.api.deps import Operator, ServicesDep, Viewer
from fleet_server.api.params import Cursor, Limit
from fleet_server.api.rollout_schemas import (
    PinIn,
    PinOut,
    ResumeIn,
    RolloutDetail,
    RolloutDeviceOut,
    RolloutDevicePage,
    RolloutOut,
    RolloutPage,
    VerdictOut,
    WaveOut,
)
from fleet_server.api.schemas import ERRORS
from fleet_server.domain import utcnow
from fleet_server.rollouts import operations
from fleet_server.rollouts.domain import DeviceState, RolloutSpec, RolloutState
from fleet_server.rollouts.reconcile import judge
from fleet_server.store import assignments
from fleet_server.store import rollouts as store
from fleet_server.store.engine import Database

router = APIRouter(prefix="/api/v1/rollouts", tags=["rollouts"], responses=ERRORS)
pins = APIRouter(prefix="/api/v1/devices/{device_id}/pins", tags=["devices"], responses=ERRORS)
RolloutId = Annotated[int, Path(description="the rollout's id")]


def detail(db: Database, rollout_id: int) -> RolloutDetail:
    """A rollout with its per-wave progress and the gates' verdicts now.

    Raises:
        NotFound: no such rollout.
    """
    with db.read() as session:
        rollout = store.get_rollout(session, rollout_id)
        waves = store.progress(session, rollout)
        totals = store.totals(session, [rollout_id])[rollout_id]
        running = rollout.state in (RolloutState.RUNNING, RolloutState.PAUSED)
        verdicts = judge(session, rollout) if running and rollout.current_wave >= 0 else []
    out = RolloutOut.of(rollout, totals)
    return RolloutDetail(
        **out.model_dump(),
        waves_progress=[WaveOut.of(w) for w in waves],
        health=[VerdictOut.of(v) for v in verdicts],
    )


@router.post(
    "",
    response_model=RolloutDetail,
    status_code=status.HTTP_201_CREATED,
    summary="Create a rollout",
)
def create_rollout(spec: RolloutSpec, svc: ServicesDep, who: Operator) -> RolloutDetail:
    """Plan the target into waves and start it (the engine starts the first wave at its
    next tick). 404 for an unknown release; 422 ``no_devices``, ``unknown_device`` or
    ``unknown_variant``."""
    with svc.db.write() as session:
        rollout = operations.create(
            session, spec, actor=who.actor, now=utcnow(), stale_after=svc.stale_after
        )
    return detail(svc.db, rollout.id)


@router.get("", response_model=RolloutPage, summary="List rollouts")
def list_rollouts(
    *,
    svc: ServicesDep,
    _: Viewer,
    state: RolloutState | None = None,
    model: str | None = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> RolloutPage:
    """Rollouts, newest first, with their devices counted by state."""
    with svc.db.read() as session:
        page = store.list_rollouts(session, state=state, model=model, limit=limit, cursor=cursor)
        totals = store.totals(session, [r.id for r in page.items])
    return RolloutPage(
        items=[RolloutOut.of(r, totals[r.id]) for r in page.items], next_cursor=page.next_cursor
    )


@router.get("/{rollout_id}", response_model=RolloutDetail, summary="Show a rollout")
def show_rollout(rollout_id: RolloutId, svc: ServicesDep, _: Viewer) -> RolloutDetail:
    """The rollout, each wave's devices by state, and the health gates' verdicts now."""
    return detail(svc.db, rollout_id)


@router.get("/{rollout_id}/devices", response_model=RolloutDevicePage, summary="Its devices")
def rollout_devices(
    *,
    rollout_id: RolloutId,
    svc: ServicesDep,
    _: Viewer,
    wave: Annotated[int | None, Query(ge=0, description="1-based; 0: never planned")] = None,
    state: DeviceState | None = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> RolloutDevicePage:
    """The rollout's devices by id: state, reason, last update event, previous version."""
    with svc.db.read() as session:
        store.get_rollout(session, rollout_id)  # 404 when unknown
        page = store.list_devices(
            session,
            rollout_id,
            wave=wave - 1 if wave is not None else None,
            state=state,
            limit=limit,
            cursor=cursor,
        )
    return RolloutDevicePage(
        items=[RolloutDeviceOut.of(d) for d in page.items], next_cursor=page.next_cursor
    )


@router.post("/{rollout_id}/pause", response_model=RolloutDetail, summary="Pause a rollout")
def pause_rollout(rollout_id: RolloutId, svc: ServicesDep, who: Operator) -> RolloutDetail:
    """Nothing new is assigned until it is resumed (409 unless running)."""
    with svc.db.write() as session:
        done = operations.pause(session, rollout_id, actor=who.actor, now=utcnow())
    return detail(svc.db, done.id)


@router.post("/{rollout_id}/resume", response_model=RolloutDetail, summary="Resume a rollout")
def resume_rollout(
    rollout_id: RolloutId,
    svc: ServicesDep,
    who: Operator,
    body: Annotated[ResumeIn | None, Body()] = None,
) -> RolloutDetail:
    """Resume a paused rollout (409 unless paused); ``force`` waives the failures so far."""
    force = body.force if body is not None else False
    with svc.db.write() as session:
        done = operations.resume(session, rollout_id, actor=who.actor, now=utcnow(), force=force)
    return detail(svc.db, done.id)


@router.post("/{rollout_id}/abort", response_model=RolloutDetail, summary="Abort a rollout")
def abort_rollout(rollout_id: RolloutId, svc: ServicesDep, who: Operator) -> RolloutDetail:
    """Stop it; unassigned devices are cancelled, assigned ones keep the new version."""
    with svc.db.write() as session:
        done = operations.abort(session, rollout_id, actor=who.actor, now=utcnow())
    return detail(svc.db, done.id)


@router.post("/{rollout_id}/rollback", response_model=RolloutDetail, summary="Roll back")
def rollback_rollout(rollout_id: RolloutId, svc: ServicesDep, who: Operator) -> RolloutDetail:
    """Move every device the rollout assigned back to what it ran before (the engine does
    it over its next ticks; the rollout ends ``rolled_back``)."""
    with svc.db.write() as session:
        done = operations.rollback(session, rollout_id, actor=who.actor, now=utcnow())
    return detail(svc.db, done.id)


# --- pins -------------------------------------------------------------------------------


@pins.get("", response_model=list[PinOut], summary="A device's pins")
def list_pins(device_id: str, svc: ServicesDep, _: Viewer) -> list[PinOut]:
    """The model versions this device is pinned to."""
    with svc.db.read() as session:
        return [PinOut.of(p) for p in assignments.pins_of(session, device_id)]


@pins.put("/{model}", response_model=PinOut, summary="Pin a device to a model version")
def put_pin(device_id: str, model: str, body: PinIn, svc: ServicesDep, who: Operator) -> PinOut:
    """The device runs this version whatever rollouts say, until unpinned (audited)."""
    with svc.db.write() as session:
        pin = operations.pin(
            session,
            device_id,
            model,
            body.version,
            variant=body.variant,
            actor=who.actor,
            now=utcnow(),
        )
    return PinOut.of(pin)


@pins.delete("/{model}", response_model=PinOut, summary="Unpin a device")
def delete_pin(device_id: str, model: str, svc: ServicesDep, who: Operator) -> PinOut:
    """Remove the pin (what the device runs does not change); returns the removed pin."""
    with svc.db.write() as session:
        pin = operations.unpin(session, device_id, model, actor=who.actor, now=utcnow())
    return PinOut.of(pin)
