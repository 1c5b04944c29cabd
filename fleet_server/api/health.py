"""Liveness, readiness and the server's own health (ingest counters, schema revision)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

import fleet_server
from fleet_server.api.deps import ServicesDep, Viewer
from fleet_server.errors import FleetError
from fleet_server.store import migrate

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness")
def healthz() -> dict[str, str]:
    """200 while the process serves requests."""
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness", response_model=None)
def readyz(svc: ServicesDep) -> dict[str, str] | JSONResponse:
    """200 when the database answers, else 503 with the error code."""
    try:
        svc.db.ping()
    except FleetError as exc:
        return JSONResponse({"status": "unavailable", "error": exc.to_dict()}, status_code=503)
    return {"status": "ready"}


@router.get("/api/v1/health", summary="Server health")
def health(svc: ServicesDep, _: Viewer) -> dict[str, Any]:
    """Version, database dialect and schema revision, and the ingest counters (of the
    process that answers: with ``serve --workers N`` one process runs the ingest, and
    ``background`` says whether it is this one)."""
    here = svc.background_here()
    return {
        "version": fleet_server.__version__,
        "database": {"dialect": svc.db.dialect, "revision": migrate.current(svc.db)},
        "background": "this process" if here else "another process",
        "ingest": svc.ingest.stats.snapshot() if svc.ingest is not None and here else None,
    }
