"""The fleet pages: the overview (and its live fragment), the devices table and a
device's page."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field

from fleet_server.domain import TAG_KEY_RE, DeviceState, parse_tag, utcnow
from fleet_server.errors import ValidationError
from fleet_server.store import assignments
from fleet_server.store import devices as inventory
from fleet_server.store.devices import DeviceFilter

from . import charts, device_table, summary
from .access import ApiUserDep, PageRoute, UserDep, services_of
from .device_table import SortKey, TableQuery
from .profiles import profile_info
from .render import render

router = APIRouter(route_class=PageRoute, include_in_schema=False)
PAGE_SIZES = (25, 50, 100, 200)


def _overview_data(request: Request, now: datetime) -> dict[str, Any]:
    svc = services_of(request)
    with svc.db.read() as session:
        counts = summary.state_counts(session, now, svc.stale_after)
        return {
            "counts": counts,
            "total": sum(counts.values()),
            "rollouts": summary.active_rollouts(session),
            "now": now,
        }


@router.get("/", summary="Fleet overview")
def overview(request: Request, user: UserDep) -> Response:
    """Device counts by state, profile and model version; active rollouts; failures."""
    now = utcnow()
    svc = services_of(request)
    data = _overview_data(request, now)
    with svc.db.read() as session:
        data |= {
            "profiles": summary.by_profile(session),
            "versions": summary.by_model_version(session),
            "failures": summary.recent_failures(session),
        }
    return render(
        request, "overview.html", {"user": user, "active": "overview", "title": "Fleet", **data}
    )


@router.get("/live/overview", summary="The overview's live part")
def overview_live(request: Request, user: ApiUserDep) -> Response:
    """The state counts and active rollouts as an HTML fragment (polled by the page)."""
    data = _overview_data(request, utcnow())
    return render(request, "overview_live.html", {"user": user, **data})


class DeviceParams(BaseModel):
    """The devices page's query: filters, sort order and page."""

    q: str = Field(default="", max_length=64, description="device id contains")
    tag: str = Field(default="", max_length=200, description="key=value, or key")
    profile: str = Field(default="", max_length=128)
    version: str = Field(default="", max_length=130, description="model@version")
    state: DeviceState | Literal[""] = ""
    revoked: Literal["any", "yes", "no"] = "any"
    sort: SortKey = SortKey.ID
    order: Literal["asc", "desc"] = "asc"
    limit: int = Field(default=50, ge=1, le=200)
    after: str | None = Field(default=None, max_length=400)
    before: str | None = Field(default=None, max_length=400)

    def shown(self) -> dict[str, Any]:
        """What the page's links and form carry over (not the cursors)."""
        return self.model_dump(mode="json", exclude={"after", "before"})

    def device_filter(self) -> DeviceFilter:
        """The inventory filter.

        Raises:
            ValidationError: a malformed tag (``bad_tag``).
        """
        tags: dict[str, str | None] = {}
        tag = self.tag.strip()
        if tag:
            try:
                key, value = parse_tag(tag) if "=" in tag else (tag, None)
            except ValueError as exc:
                raise ValidationError(str(exc), code="bad_tag") from None
            if not TAG_KEY_RE.match(key):
                raise ValidationError(f"tag: {key!r} is not a tag key", code="bad_tag")
            tags[key] = value
        model, _, version = self.version.partition("@")
        return DeviceFilter(
            tags=tags,
            profile=self.profile or None,
            model=model or None,
            model_version=version or None,
            state=self.state or None,
            revoked={"yes": True, "no": False}.get(self.revoked),
        )


@router.get("/devices", summary="Devices")
def devices_page(
    request: Request, user: UserDep, params: Annotated[DeviceParams, Query()]
) -> Response:
    """The filtered, sorted, keyset-paginated device table."""
    svc = services_of(request)
    error = None
    try:
        flt = params.device_filter()
    except ValidationError as exc:
        error, flt = exc.message, DeviceFilter()
    query = TableQuery(
        flt,
        search=params.q.strip() or None,
        sort=params.sort,
        descending=params.order == "desc",
        limit=params.limit,
        after=params.after,
        before=params.before,
    )
    with svc.db.read() as session:
        page = device_table.list_page(session, query, stale_after=svc.stale_after)
        choices = {
            "profiles": device_table.profiles(session),
            "versions": device_table.model_versions(session),
        }
    return render(
        request,
        "devices.html",
        {
            "user": user,
            "active": "devices",
            "title": "Devices",
            "page": page,
            "params": params.shown(),
            "error": error,
            "states": summary.STATES,
            "sorts": [(k.value, k.value.replace("_", " ")) for k in SortKey],
            "page_sizes": PAGE_SIZES,
            "now": utcnow(),
            **choices,
        },
    )


@router.get("/devices/{device_id}", summary="A device")
def device_page(
    request: Request,
    device_id: str,
    user: UserDep,
    window: Annotated[str, Query(max_length=8)] = charts.DEFAULT_WINDOW,
) -> Response:
    """Status, hardware and profile, models, update history and telemetry charts.

    Raises:
        NotFound: no such device (a 404 page).
    """
    svc = services_of(request)
    label = window if window in charts.WINDOWS else charts.DEFAULT_WINDOW
    now = utcnow()
    with svc.db.read() as session:
        device = inventory.get_device(session, device_id, stale_after=svc.stale_after)
        pins = assignments.pins_of(session, device_id)
        history = summary.device_updates(session, device_id)
        chart_set = charts.device_charts(
            session,
            device_id,
            label=label,
            now=now,
            interval_s=svc.settings.telemetry.interval_s,
        )
    desired = {d.name: d for d in device.desired}
    return render(
        request,
        "device.html",
        {
            "user": user,
            "active": "devices",
            "title": f"Device {device.id}",
            "device": device,
            "profile": profile_info(device.profile),
            "desired": desired,
            "pins": {p.model: p for p in pins},
            "history": history,
            "charts": chart_set.to_json(),
            "window": label,
            "windows": list(charts.WINDOWS),
            "now": now,
        },
        charts=True,
    )
