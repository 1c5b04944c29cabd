"""Device inventory routes: list (filters, keyset pages), show, tag, revoke, telemetry."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query

from fleet_server.api.deps import Operator, ServicesDep, Viewer
from fleet_server.api.params import Cursor, Limit, Since, Step, Until, window
from fleet_server.api.schemas import (
    ERRORS,
    DeviceOut,
    DevicePage,
    DeviceSeries,
    SystemPointOut,
    TagChange,
)
from fleet_server.domain import TAG_KEY_RE, TAG_VALUE_MAX, DeviceState, parse_tag
from fleet_server.errors import ValidationError
from fleet_server.store import devices, timeseries

router = APIRouter(prefix="/api/v1/devices", tags=["devices"], responses=ERRORS)


def _tag_filter(tags: list[str]) -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for text in tags:
        if "=" not in text:
            if not TAG_KEY_RE.match(text):
                raise ValidationError(f"tag: {text!r} is not a tag key", code="bad_tag")
            out[text] = None
            continue
        try:
            key, value = parse_tag(text)
        except ValueError as exc:
            raise ValidationError(str(exc), code="bad_tag") from None
        out[key] = value
    return out


@router.get("", response_model=DevicePage, summary="List devices")
def list_devices(
    *,
    svc: ServicesDep,
    _: Viewer,
    tag: Annotated[list[str], Query(description="key=value (or key): repeat for AND")] = [],  # noqa: B006
    profile: str | None = None,
    model: Annotated[str | None, Query(description="runs this model")] = None,
    model_version: Annotated[str | None, Query(description="runs this model version")] = None,
    state: DeviceState | None = None,
    revoked: bool | None = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> DevicePage:
    """Devices matching every filter, ordered by id; follow ``next_cursor`` for more."""
    flt = devices.DeviceFilter(
        tags=_tag_filter(tag),
        profile=profile,
        model=model,
        model_version=model_version,
        state=state,
        revoked=revoked,
    )
    with svc.db.read() as session:
        page = devices.list_devices(
            session, flt, stale_after=svc.stale_after, limit=limit, cursor=cursor
        )
    return DevicePage(items=[DeviceOut.of(d) for d in page.items], next_cursor=page.next_cursor)


@router.get("/{device_id}", response_model=DeviceOut, summary="Show one device")
def get_device(device_id: str, svc: ServicesDep, _: Viewer) -> DeviceOut:
    """One device with its tags, facts, reported and desired models."""
    with svc.db.read() as session:
        return DeviceOut.of(devices.get_device(session, device_id, stale_after=svc.stale_after))


@router.patch("/{device_id}/tags", response_model=DeviceOut, summary="Change a device's tags")
def tag_device(device_id: str, change: TagChange, svc: ServicesDep, who: Operator) -> DeviceOut:
    """Set and remove tags (audited)."""
    for key, value in change.set.items():
        if not TAG_KEY_RE.match(key) or len(value) > TAG_VALUE_MAX:
            raise ValidationError(f"set.{key}: bad tag key or value too long", code="bad_tag")
    with svc.db.write() as session:
        device = devices.set_tags(
            session,
            device_id,
            put=change.set,
            remove=change.remove,
            actor=who.actor,
            stale_after=svc.stale_after,
        )
    return DeviceOut.of(device)


@router.post("/{device_id}/revoke", response_model=DeviceOut, summary="Revoke a device")
def revoke_device(device_id: str, svc: ServicesDep, who: Operator) -> DeviceOut:
    """Mark the device revoked (audited): its MQTT messages are dropped, its director
    metadata refused, and its certificate added to the CRL that the broker reads (copied
    to ``ca.crl_file``; the broker applies it when it reloads). Idempotent."""
    with svc.db.write() as session:
        device = devices.revoke_device(
            session, device_id, actor=who.actor, stale_after=svc.stale_after
        )
        if device.cert_serial and svc.revocations is not None:
            # before the commit: if the CRL cannot be written, the device stays unrevoked
            svc.revocations.revoke(device.cert_serial)
    return DeviceOut.of(device)


@router.get("/{device_id}/telemetry", response_model=DeviceSeries, summary="Device metrics")
def device_telemetry(
    *,
    device_id: str,
    svc: ServicesDep,
    _: Viewer,
    since: Since = None,
    until: Until = None,
    step: Step = None,
) -> DeviceSeries:
    """System metrics of one device over time (averaged per step)."""
    w = window(since, until, step)
    with svc.db.read() as session:
        devices.get_device(session, device_id, stale_after=svc.stale_after)  # 404 if unknown
        points = timeseries.device_series(
            session, device_id, since=w.since, until=w.until, step=w.step
        )
    start, end = w.bounds()
    return DeviceSeries(
        device_id=device_id,
        since=start,
        until=end,
        step_s=w.step,
        points=[
            SystemPointOut(**{**p.__dict__, "ts": datetime.fromtimestamp(p.ts, UTC)})
            for p in points
        ],
    )
