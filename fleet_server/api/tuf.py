"""The signed update metadata devices poll (no API token: devices trust the signatures).

    GET /tuf/image/{name}              the image repository: 1.root.json ... N.root.json,
                                       root.json, timestamp.json, {v}.snapshot.json,
                                       {v}.targets.json (consistent snapshots)
    GET /tuf/director/{device}/{name}  the device's own director metadata, the same names

Director metadata is built from the device's rows in ``desired_models`` and its revision
in ``device_revisions`` when the device asks for ``timestamp.json`` (see
:mod:`fleet_server.tuf.director`): every replica signs the same bytes. The snapshot and
targets that timestamp names come from the director's short-lived cache without a
database read when this replica built them; the director's roots are public and the same
for every device, so they are served to any valid device id without one. Versioned files
never change once published, so they may be cached; ``timestamp.json`` and ``root.json``
must not be.

The handlers are coroutines: answers from memory never wait for a worker thread; the
database read of a timestamp runs in one.
"""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request, Response
from starlette.concurrency import run_in_threadpool

from fleet_server.api.deps import Services, ServicesDep
from fleet_server.api.schemas import ErrorResponse
from fleet_server.errors import Conflict, Forbidden
from fleet_server.integrations import target_path
from fleet_server.store.desired import DesiredSet, desired_set
from fleet_server.trust import Repositories
from fleet_server.tuf import Assignment, MetadataNotFound, check_device_id
from fleet_server.tuf.image_repo import ImageRepository

log = logging.getLogger("fleet_server.api.tuf")

router = APIRouter(
    tags=["updates"],
    responses={
        404: {"model": ErrorResponse, "description": "no such metadata file or device"},
    },
)

_IMMUTABLE = "public, max-age=31536000, immutable"
_JSON = "application/json"


def _metadata(content: bytes, name: str) -> Response:
    mutable = name in ("timestamp.json", "root.json")
    headers = {"Cache-Control": "no-store" if mutable else _IMMUTABLE}
    return Response(content, media_type=_JSON, headers=headers)


def _repositories(svc: ServicesDep) -> Repositories:
    if svc.repositories is None:
        raise MetadataNotFound("this server has no update repositories (edge-fleet keys init)")
    return svc.repositories


@router.get(
    "/tuf/image/{name}",
    summary="Image repository metadata",
    response_class=Response,
    responses={200: {"content": {_JSON: {}}, "description": "signed TUF metadata"}},
)
async def image_metadata(name: str, svc: ServicesDep) -> Response:
    """A metadata file of the image repository, signed, exactly as stored."""
    return _metadata(_repositories(svc).image.read(name), name)


def assignments_of(desired: DesiredSet, image: ImageRepository) -> list[Assignment]:
    """The director assignments of a device: each desired variant as the image repository
    signed it (same path, length and hashes).

    Raises:
        Conflict: a desired release variant does not exist or is not signed, or the device
            has no profile (``assignment_invalid``); serving a partial list would tell the
            device to drop a model, so nothing is served.
    """
    if desired.artifacts and desired.profile is None:
        raise Conflict(
            f"device {desired.device_id} has desired models but no profile",
            code="assignment_invalid",
        )
    out = []
    for a in desired.artifacts:
        what = f"{a.model} {a.version} ({a.variant})"
        if a.filename is None:
            raise Conflict(f"desired release {what} does not exist", code="assignment_invalid")
        target = image.get_target(target_path(a.model, a.version, a.variant, a.filename))
        if target is None or target.hashes.get("sha256") != a.sha256:
            raise Conflict(f"desired release {what} is not signed", code="assignment_invalid")
        assert desired.profile is not None
        rollout = str(a.rollout_id) if a.rollout_id is not None else None
        out.append(Assignment.for_target(target, profile=desired.profile, rollout_id=rollout))
    return out


@router.get(
    "/tuf/director/{device_id}/{name}",
    summary="Director metadata of one device",
    response_class=Response,
    responses={
        200: {"content": {_JSON: {}}, "description": "signed TUF metadata"},
        403: {"model": ErrorResponse, "description": "revoked, or not this device's certificate"},
        409: {"model": ErrorResponse, "description": "an assignment cannot be signed"},
        422: {"model": ErrorResponse, "description": "not a valid device id"},
    },
)
async def director_metadata(
    device_id: str, name: str, request: Request, svc: ServicesDep
) -> Response:
    """The device's director metadata: exactly the artifacts it must run, signed with the
    director's online keys, with a short expiry."""
    check_device_id(device_id)
    header = svc.settings.tuf.director_client_cn_header
    if header is not None and request.headers.get(header) != device_id:
        raise Forbidden(f"this client's certificate is not {device_id}'s")
    repositories = _repositories(svc)
    director = repositories.director
    if director is None:
        raise MetadataNotFound("this server has no director repository")
    if name == "root.json" or name.endswith(".root.json"):  # the same for every device
        return _metadata(director.serve(device_id, name, []), name)
    cached = director.cached(device_id, name)
    if cached is not None:
        return _metadata(cached, name)
    return _metadata(await run_in_threadpool(_build, svc, repositories, device_id, name), name)


def _build(svc: Services, repositories: Repositories, device_id: str, name: str) -> bytes:
    """Read the device's desired set and serve ``name`` from it (in a worker thread).

    Raises:
        NotFound: no such device. Forbidden: the device is revoked.
        Conflict: an assignment cannot be signed. MetadataNotFound: no such file.
    """
    director = repositories.director
    assert director is not None
    with svc.db.read() as session:
        desired = desired_set(session, device_id)
    if desired.revoked_at is not None:
        raise Forbidden(f"device {device_id} is revoked", code="device_revoked")
    assignments = assignments_of(desired, repositories.image)
    return director.serve(device_id, name, assignments, desired.revision)
