"""Model release routes: upload (validated before anything is stored), list, show, metrics."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from starlette.concurrency import run_in_threadpool

from fleet_server.api.deps import Operator, ServicesDep, Viewer
from fleet_server.api.params import Cursor, Limit, Since, Step, Until, window
from fleet_server.api.schemas import (
    ERRORS,
    ErrorResponse,
    ModelPointOut,
    ModelSeries,
    ReleaseOut,
    ReleasePage,
)
from fleet_server.api.uploads import receive_upload
from fleet_server.releases import DEFAULT_VARIANT, UploadRequest
from fleet_server.store import releases, timeseries

router = APIRouter(prefix="/api/v1/models", tags=["models"], responses=ERRORS)

_UPLOAD_DOC = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "a bundle (.tar, .tgz, .tar.gz) or a model file "
                            "(.onnx, .ort, .tflite)",
                        },
                        "version": {
                            "type": "string",
                            "description": "semantic version; required for a bare model file",
                        },
                        "variant": {"type": "string", "default": DEFAULT_VARIANT},
                        "name": {"type": "string", "description": "default: the manifest's"},
                    },
                }
            }
        },
    }
}


@router.post(
    "",
    status_code=201,
    response_model=ReleaseOut,
    summary="Upload a model release",
    openapi_extra=_UPLOAD_DOC,
    responses={
        409: {"model": ErrorResponse, "description": "this release variant exists"},
        413: {"model": ErrorResponse, "description": "over the upload size cap"},
        422: {"model": ErrorResponse, "description": "the bundle fails validation"},
    },
)
async def upload_release(request: Request, svc: ServicesDep, who: Operator) -> ReleaseOut:
    """Stream the upload to disk, validate it with the agent's own loader on the CPU
    (manifest, tensors, golden vectors), then store it. Nothing is stored on failure."""
    settings = svc.settings
    upload = await receive_upload(
        request,
        tmp_dir=settings.resolved_artifacts_dir() / "tmp",
        max_bytes=settings.max_upload_bytes,
    )
    try:
        req = UploadRequest(
            filename=upload.filename,
            version=upload.fields.get("version") or None,
            variant=upload.fields.get("variant") or DEFAULT_VARIANT,
            name=upload.fields.get("name") or None,
        )
        release = await run_in_threadpool(svc.releases.publish, upload.path, req, actor=who.actor)
    finally:
        upload.cleanup()
    return ReleaseOut.of(release)


@router.get("", response_model=ReleasePage, summary="List releases")
def list_releases(
    *,
    svc: ServicesDep,
    _: Viewer,
    name: Annotated[str | None, Query(description="only this model")] = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> ReleasePage:
    """Releases, newest first."""
    with svc.db.read() as session:
        page = releases.list_releases(session, name=name, limit=limit, cursor=cursor)
    return ReleasePage(items=[ReleaseOut.of(r) for r in page.items], next_cursor=page.next_cursor)


@router.get("/{name}/telemetry", response_model=ModelSeries, summary="Model serving metrics")
def model_telemetry(
    *,
    name: str,
    svc: ServicesDep,
    _: Viewer,
    device: Annotated[str | None, Query(description="only this device")] = None,
    since: Since = None,
    until: Until = None,
    step: Step = None,
) -> ModelSeries:
    """Requests and errors per step (summed over devices), latency percentiles (worst
    device), and how many devices reported."""
    w = window(since, until, step)
    with svc.db.read() as session:
        points = timeseries.model_series(
            session, name, since=w.since, until=w.until, step=w.step, device_id=device
        )
    start, end = w.bounds()
    return ModelSeries(
        model=name,
        device_id=device,
        since=start,
        until=end,
        step_s=w.step,
        points=[
            ModelPointOut(**{**p.__dict__, "ts": datetime.fromtimestamp(p.ts, UTC)}) for p in points
        ],
    )


@router.get("/{name}/{version}", response_model=ReleaseOut, summary="Show a release")
def get_release(name: str, version: str, svc: ServicesDep, _: Viewer) -> ReleaseOut:
    """One release with every variant, its digest, size and manifest."""
    with svc.db.read() as session:
        return ReleaseOut.of(releases.get_release(session, name, version))
