"""The models page (releases, variants, hashes and signatures, where each version runs)
and the audit log page."""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from fleet_server.domain import ModelRelease, Role, utcnow
from fleet_server.errors import FleetError
from fleet_server.integrations import target_path
from fleet_server.store import audit, releases
from fleet_server.store.models import DesiredModelRow, DeviceModelRow, DeviceRow, ReleaseRow
from fleet_server.trust import Repositories

from .access import PageRoute, UserDep, require_role, services_of
from .render import render

router = APIRouter(route_class=PageRoute, include_in_schema=False)
log = logging.getLogger("fleet_server.dashboard")


@dataclass(frozen=True)
class Placement:
    """Where one release version runs: reporting devices by profile, and assignments."""

    running: int
    by_profile: list[tuple[str, int]]
    desired: int


def _placements(session: Session, names: list[str]) -> dict[tuple[str, str], Placement]:
    m, d = DeviceModelRow, DesiredModelRow
    running: dict[tuple[str, str], list[tuple[str, int]]] = defaultdict(list)
    by_profile = (
        select(m.model, m.version, DeviceRow.profile, func.count())
        .join(DeviceRow, DeviceRow.id == m.device_id)
        .where(m.model.in_(names))
        .group_by(m.model, m.version, DeviceRow.profile)
    )
    for model, version, profile, n in session.execute(by_profile):
        running[(model, version)].append((profile or "not reported", int(n)))
    desired: dict[tuple[str, str], int] = {}
    assigned = select(d.model, d.version, func.count()).where(d.model.in_(names))
    for model, version, n in session.execute(assigned.group_by(d.model, d.version)):
        desired[(model, version)] = int(n)
    out: dict[tuple[str, str], Placement] = {}
    for key in set(running) | set(desired):
        profiles = sorted(running.get(key, []), key=lambda pn: (-pn[1], pn[0]))
        out[key] = Placement(sum(n for _, n in profiles), profiles, desired.get(key, 0))
    return out


def _signatures(repos: Repositories | None, items: list[ModelRelease]) -> dict[str, str]:
    """``target path -> signed|unsigned|mismatch`` (empty without a TUF repository)."""
    if repos is None:
        return {}
    try:
        targets = repos.image.targets()
    except FleetError as exc:
        log.warning("dashboard: cannot read the signed targets: %s", exc)
        return {}
    out: dict[str, str] = {}
    for release in items:
        for v in release.variants:
            path = target_path(release.name, release.version, v.variant, v.filename)
            target = targets.get(path)
            if target is None:
                out[path] = "unsigned"
            else:
                same = target.hashes.get("sha256") == v.sha256 and target.length == v.size
                out[path] = "signed" if same else "mismatch"
    return out


@router.get("/models", summary="Model releases")
def models_page(
    *,
    request: Request,
    user: UserDep,
    name: Annotated[str, Query(max_length=64)] = "",
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Releases (newest first), their variants, hashes and signatures, and where each
    version runs."""
    svc = services_of(request)
    with svc.db.read() as session:
        page = releases.list_releases(session, name=name or None, limit=20, cursor=cursor)
        names = sorted({r.name for r in page.items})
        placements = _placements(session, names)
        all_names = sorted(str(n) for n in session.scalars(select(ReleaseRow.name).distinct()))
    signatures = _signatures(svc.repositories, page.items)
    paths = {
        (r.name, r.version, v.variant): target_path(r.name, r.version, v.variant, v.filename)
        for r in page.items
        for v in r.variants
    }
    return render(
        request,
        "models.html",
        {
            "user": user,
            "active": "models",
            "title": "Models",
            "page": page,
            "placements": placements,
            "signatures": signatures,
            "signing": svc.repositories is not None,
            "paths": paths,
            "name": name,
            "names": all_names,
            "now": utcnow(),
        },
    )


def _changes(before: dict[str, Any] | None, after: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The keys whose values differ between the two pictures."""
    b, a = before or {}, after or {}
    keys = sorted(set(b) | set(a))
    return [
        {"key": k, "before": b.get(k), "after": a.get(k), "had": k in b, "has": k in a}
        for k in keys
        if b.get(k) != a.get(k) or (k in b) != (k in a)
    ]


@router.get("/audit", summary="The audit log")
def audit_page(
    *,
    request: Request,
    user: UserDep,
    target_type: Annotated[str, Query(max_length=32)] = "",
    target_id: Annotated[str, Query(max_length=128)] = "",
    actor: Annotated[str, Query(max_length=128)] = "",
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> Response:
    """Every mutation, newest first (operators and admins, as the API).

    Raises:
        Forbidden: a viewer's session (a 403 page).
    """
    require_role(user, Role.OPERATOR)
    svc = services_of(request)
    with svc.db.read() as session:
        page = audit.list_entries(
            session,
            limit=50,
            cursor=cursor,
            target_type=target_type or None,
            target_id=target_id or None,
            actor=actor or None,
        )
    entries = [(e, _changes(e.before, e.after)) for e in page.items]
    return render(
        request,
        "audit.html",
        {
            "user": user,
            "active": "audit",
            "title": "Audit log",
            "entries": entries,
            "next_cursor": page.next_cursor,
            "filters": {"target_type": target_type, "target_id": target_id, "actor": actor},
            "now": utcnow(),
        },
    )
