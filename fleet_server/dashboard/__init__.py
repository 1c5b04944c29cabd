"""The fleet dashboard: server-rendered pages at ``/`` over the same services as the API.

:func:`mount_dashboard` adds it to an app built by :func:`fleet_server.api.create_app`.
See ``docs/dashboard.md``.
"""

from __future__ import annotations

from fleet_server.dashboard.mount import mount_dashboard

__all__ = ["mount_dashboard"]
