"""The FastAPI application factory and its error handlers.

Every error answer is ``{"error": {"code", "message"}}`` with the status of the fleet
error; a database that cannot be reached answers 503 ``db_unavailable`` with
``Retry-After``. Request validation errors (422) name the offending field.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from sqlalchemy.exc import DBAPIError

import fleet_server
from fleet_server.api import (
    artifacts,
    audit,
    devices,
    enrol,
    health,
    models,
    rollouts,
    tokens,
    tuf,
)
from fleet_server.api.deps import Services
from fleet_server.errors import FleetError
from fleet_server.store.engine import translate

log = logging.getLogger("fleet_server.api")


def _error(status: int, code: str, message: str) -> JSONResponse:
    headers = {"Retry-After": "5"} if status == 503 else None
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


async def _fleet_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FleetError)
    if exc.status >= 500:
        log.warning("%s: %s", exc.code, exc.message)
    return _error(exc.status, exc.code, exc.message)


async def _db_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DBAPIError)
    err = translate(exc)
    log.warning("database error: %s", type(exc.orig).__name__)
    return _error(err.status, err.code, err.message)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    fields = [
        {"field": ".".join(str(p) for p in e["loc"]), "message": e["msg"]} for e in errors[:20]
    ]
    first = fields[0] if fields else {"field": "request", "message": "invalid"}
    body = {
        "error": {
            "code": "invalid",
            "message": f"{first['field']}: {first['message']}",
            "fields": fields,
        }
    }
    return JSONResponse(body, status_code=422)


def create_app(
    services: Services,
    *,
    lifespan: Callable[[FastAPI], AbstractAsyncContextManager[None]] | None = None,
) -> FastAPI:
    """Build the API around ``services``. ``lifespan`` starts and stops background work
    (ingest, retention); tests leave it out."""

    @asynccontextmanager
    async def _no_lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield

    app = FastAPI(
        title="edge-fleet server",
        version=fleet_server.__version__,
        description="Devices, signed model releases, telemetry and the audit log.",
        lifespan=lifespan or _no_lifespan,
    )
    app.state.services = services
    app.add_exception_handler(FleetError, _fleet_error)
    app.add_exception_handler(DBAPIError, _db_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    for module in (health, devices, enrol, models, tokens, audit, tuf, artifacts, rollouts):
        app.include_router(module.router)
    app.include_router(rollouts.pins)
    return app
