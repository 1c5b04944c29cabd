"""What the routers share: the services container and the authentication dependencies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Annotated

from fastapi import Depends, Header, Request

from fleet_server.artifacts import ArtifactStore
from fleet_server.auth import Principal, authenticate, bearer_token
from fleet_server.config import ServerSettings
from fleet_server.domain import Role
from fleet_server.enrolment import EnrolmentService
from fleet_server.ingest import IngestService
from fleet_server.releases import ReleaseService
from fleet_server.store.engine import Database
from fleet_server.trust import Repositories, Revocations


@dataclass
class Services:
    """Everything a request may need. One per process; the server keeps no other state."""

    settings: ServerSettings
    db: Database
    artifacts: ArtifactStore
    releases: ReleaseService
    enrolment: EnrolmentService
    ingest: IngestService | None = None
    #: The TUF image repository and director (None until ``edge-fleet keys init``).
    repositories: Repositories | None = None
    #: Certificate revocation and the broker's CRL (None until ``edge-fleet ca init``).
    revocations: Revocations | None = None
    #: Whether this process runs the background work (ingest, rollout engine): with
    #: ``serve --workers N`` only one process does (see :mod:`fleet_server.workers`).
    background_here: Callable[[], bool] = lambda: True

    @property
    def stale_after(self) -> timedelta:
        t = self.settings.telemetry
        return timedelta(seconds=t.interval_s * t.stale_after_intervals)


def services(request: Request) -> Services:
    """The app's :class:`Services` (set by :func:`fleet_server.api.create_app`)."""
    svc: Services = request.app.state.services
    return svc


ServicesDep = Annotated[Services, Depends(services)]


def require(role: Role) -> Callable[..., Principal]:
    """A dependency that authenticates the bearer token and checks its role.

    The dependency raises AuthError (401) or Forbidden (403).
    """

    def dependency(
        svc: ServicesDep,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Principal:
        principal = authenticate(svc.db, bearer_token(authorization))
        principal.require(role)
        return principal

    return dependency


Viewer = Annotated[Principal, Depends(require(Role.VIEWER))]
Operator = Annotated[Principal, Depends(require(Role.OPERATOR))]
Admin = Annotated[Principal, Depends(require(Role.ADMIN))]
