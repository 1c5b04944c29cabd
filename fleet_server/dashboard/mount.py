"""Mounting the dashboard on the API's app: its routers, its own static files, and the
chart library served from the installed ``plotly`` package (never a CDN)."""

from __future__ import annotations

import logging
from importlib import resources
from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

from fleet_server.api.deps import Services
from fleet_server.errors import NotFound

from . import catalog_pages, fleet_pages, login, rollout_pages
from .access import PageRoute
from .session import SessionCodec, load_key

log = logging.getLogger("fleet_server.dashboard")
STATIC_PREFIX = "/static/dashboard"
PLOTLY_PATH = "/static/vendor/plotly.min.js"


def plotly_bundle() -> Path | None:
    """``plotly.min.js`` inside the installed ``plotly`` package, or ``None``."""
    try:
        path = resources.files("plotly") / "package_data" / "plotly.min.js"
    except ModuleNotFoundError:
        return None
    found = Path(str(path))
    return found if found.is_file() else None


def _vendor_router() -> APIRouter:
    router = APIRouter(route_class=PageRoute, include_in_schema=False)
    bundle = plotly_bundle()
    if bundle is None:
        log.warning("dashboard: the plotly package is not installed; charts are off")

    @router.get(PLOTLY_PATH)
    def plotly_js() -> Response:
        """The chart library, from the installed package (cached by browsers for a day).

        Raises:
            NotFound: the plotly package is not installed.
        """
        if bundle is None:
            raise NotFound("charts need the plotly package (pip install plotly)")
        return FileResponse(
            bundle,
            media_type="text/javascript",
            headers={"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"},
        )

    return router


def mount_dashboard(app: FastAPI) -> None:
    """Add the dashboard pages, its static files and the chart library to ``app``.

    Raises:
        ConfigError: the session key in the data folder cannot be read or created.
    """
    services: Services = app.state.services
    app.state.dashboard_codec = SessionCodec(load_key(services.settings.data_dir))
    static = Path(str(resources.files("fleet_server.dashboard") / "static"))
    app.mount(STATIC_PREFIX, StaticFiles(directory=static), name="dashboard-static")
    for router in (
        login.router,
        fleet_pages.router,
        catalog_pages.router,
        rollout_pages.router,
        _vendor_router(),
    ):
        app.include_router(router)
