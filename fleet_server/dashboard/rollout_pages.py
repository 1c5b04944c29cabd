"""The rollout pages: the list, one rollout (waves, health gates, why it paused, its
devices), its live fragment, and the operators' pause, resume, abort and rollback.

The page shows what ``GET /api/v1/rollouts/{id}`` answers (the same ``detail``, with the
gates' verdicts judged now); the buttons call the same operations as the API's routes,
after the CSRF and role checks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response

from fleet_server.api.rollouts import detail
from fleet_server.domain import utcnow
from fleet_server.errors import Conflict, NotFound
from fleet_server.rollouts import operations
from fleet_server.rollouts.domain import (
    TRANSITIONS,
    Action,
    DeviceState,
    RolloutState,
    RolloutView,
)
from fleet_server.store import rollouts as store
from fleet_server.store.engine import Database

from . import summary
from .access import ApiUserDep, PageRoute, User, UserDep, checked_form, services_of
from .render import render, secure

router = APIRouter(route_class=PageRoute, include_in_schema=False)

#: The operators' actions, in the order the buttons are shown.
BUTTONS = (Action.PAUSE, Action.RESUME, Action.ABORT, Action.ROLLBACK)
DONE = {
    "pause": "Paused: nothing new is assigned until it is resumed.",
    "resume": "Resumed.",
    "abort": "Aborted: devices not yet assigned were cancelled.",
    "rollback": "Rolling back: assigned devices are being moved back.",
}


def actions_for(state: RolloutState) -> list[Action]:
    """The buttons an operator gets for a rollout in ``state``."""
    return [a for a in BUTTONS if (state, a) in TRANSITIONS]


@router.get("/rollouts", summary="Rollouts")
def rollouts_page(
    *,
    request: Request,
    user: UserDep,
    state: Annotated[str, Query(max_length=16)] = "",
    model: Annotated[str, Query(max_length=64)] = "",
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Rollouts, newest first, with their progress."""
    svc = services_of(request)
    wanted = RolloutState(state) if state in set(RolloutState) else None
    with svc.db.read() as session:
        page = store.list_rollouts(
            session, state=wanted, model=model or None, limit=25, cursor=cursor
        )
        items = summary.summaries(session, page.items)
    return render(
        request,
        "rollouts.html",
        {
            "user": user,
            "active": "rollouts",
            "title": "Rollouts",
            "items": items,
            "next_cursor": page.next_cursor,
            "filters": {"state": state if wanted else "", "model": model},
            "states": list(RolloutState),
            "now": utcnow(),
        },
    )


@dataclass(frozen=True)
class DeviceView:
    """Which of a rollout's devices the page lists."""

    wave: int | None = None
    state: DeviceState | None = None
    cursor: str | None = None

    @classmethod
    def parse(cls, wave: int | None, state: str, cursor: str | None) -> DeviceView:
        return cls(wave, DeviceState(state) if state in set(DeviceState) else None, cursor)

    def params(self) -> dict[str, Any]:
        return {"wave": self.wave or "", "dstate": self.state.value if self.state else ""}


def _context(request: Request, user: User, rollout_id: int, view: DeviceView) -> dict[str, Any]:
    db = services_of(request).db
    info = detail(db, rollout_id)
    with db.read() as session:
        devices = store.list_devices(
            session,
            rollout_id,
            wave=view.wave - 1 if view.wave is not None else None,
            state=view.state,
            limit=50,
            cursor=view.cursor,
        )
    return {
        "user": user,
        "r": info,
        "actions": actions_for(info.state) if user.can_operate else [],
        "devices": devices,
        "filters": view.params(),
        "device_states": list(DeviceState),
        "now": utcnow(),
    }


Wave = Annotated[int | None, Query(ge=1, le=1000)]
DState = Annotated[str, Query(max_length=16)]
PageCursor = Annotated[str | None, Query(max_length=200)]


@router.get("/rollouts/{rollout_id}", summary="A rollout")
def rollout_page(
    *,
    request: Request,
    rollout_id: int,
    user: UserDep,
    wave: Wave = None,
    dstate: DState = "",
    cursor: PageCursor = None,
    done: Annotated[str, Query(max_length=16)] = "",
) -> Response:
    """Waves, gates, the reason for its state, buttons for operators, and its devices.

    Raises:
        NotFound: no such rollout (a 404 page).
    """
    context = _context(request, user, rollout_id, DeviceView.parse(wave, dstate, cursor))
    context |= {"active": "rollouts", "title": f"Rollout {rollout_id}", "done": DONE.get(done)}
    return render(request, "rollout.html", context)


@router.get("/live/rollouts/{rollout_id}", summary="A rollout's live part")
def rollout_live(
    *,
    request: Request,
    rollout_id: int,
    user: ApiUserDep,
    wave: Wave = None,
    dstate: DState = "",
    cursor: PageCursor = None,
) -> Response:
    """State, reason, waves, gates, buttons and devices as an HTML fragment (polled).

    Raises:
        NotFound: no such rollout.
    """
    view = DeviceView.parse(wave, dstate, cursor)
    return render(request, "rollout_live.html", _context(request, user, rollout_id, view))


def _apply(db: Database, rollout_id: int, action: Action, user: User, force: bool) -> RolloutView:
    now, actor = utcnow(), user.principal.actor
    with db.write() as session:
        if action is Action.PAUSE:
            return operations.pause(session, rollout_id, actor=actor, now=now)
        if action is Action.RESUME:
            return operations.resume(session, rollout_id, actor=actor, now=now, force=force)
        if action is Action.ABORT:
            return operations.abort(session, rollout_id, actor=actor, now=now)
        return operations.rollback(session, rollout_id, actor=actor, now=now)


@router.post("/rollouts/{rollout_id}/{verb}", summary="Act on a rollout")
async def rollout_action(
    request: Request, rollout_id: int, verb: str, user: ApiUserDep
) -> Response:
    """Pause, resume (``force`` waives the failures so far), abort or roll back.

    Raises:
        Forbidden: a bad CSRF secret or a viewer's session (403 page).
        NotFound: no such rollout or action (404 page).
        Conflict: the action is not allowed in the rollout's state (409 page).
    """
    form = await checked_form(request, user)
    try:
        action = Action(verb)
    except ValueError:
        raise NotFound(f"no rollout action {verb!r}") from None
    if action not in BUTTONS:
        raise NotFound(f"no rollout action {verb!r}")
    force = form.get("force") == "yes"
    svc = services_of(request)
    try:
        _apply(svc.db, rollout_id, action, user, force)
    except Conflict as exc:
        context = {
            "user": user,
            "title": "Not done",
            "code": exc.code,
            "message": exc.message,
            "status": exc.status,
            "back": f"/rollouts/{rollout_id}",
        }
        return render(request, "error.html", context, status=exc.status)
    base = request.scope.get("root_path", "")
    target = f"{base}/rollouts/{rollout_id}?done={action.value}"
    return secure(RedirectResponse(target, status_code=303))
