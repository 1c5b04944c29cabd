"""The HTTP API (FastAPI): ``create_app(services)`` builds the application."""

from __future__ import annotations

from fleet_server.api.app import create_app
from fleet_server.api.deps import Services

__all__ = ["Services", "create_app"]
