"""What a device should run, as the director needs it: its desired models joined with the
release variants they name (for the artifact's file name), its profile, its revocation and
its director revision (``device_revisions``, bumped by
:func:`fleet_server.store.assignments.set_desired` and never decreasing)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import and_, select
from sqlalchemy.orm import Session

from fleet_server.errors import NotFound
from fleet_server.store.assignments import device_revision
from fleet_server.store.models import DesiredModelRow, DeviceRow, ReleaseRow, VariantRow


@dataclass(frozen=True)
class DesiredArtifact:
    """One desired model version; ``filename``/``sha256`` (of the release variant it
    names) are None when that variant does not exist."""

    model: str
    version: str
    variant: str
    rollout_id: int | None
    filename: str | None
    sha256: str | None


@dataclass(frozen=True)
class DesiredSet:
    """A device's desired artifacts, with what the director checks about the device."""

    device_id: str
    profile: str | None
    revoked_at: datetime | None
    artifacts: tuple[DesiredArtifact, ...]
    #: Increases whenever the device's desired models change (0: never assigned).
    revision: int


def desired_set(session: Session, device_id: str) -> DesiredSet:
    """The desired artifacts of ``device_id``, ordered by model name.

    Raises:
        NotFound: no device has this id.
    """
    device = session.execute(
        select(DeviceRow.profile, DeviceRow.revoked_at).where(DeviceRow.id == device_id)
    ).first()
    if device is None:
        raise NotFound(f"no device {device_id!r}")
    d, r, v = DesiredModelRow, ReleaseRow, VariantRow
    stmt = (
        select(d.model, d.version, d.variant, d.rollout_id, v.filename, v.sha256)
        .select_from(d)
        .outerjoin(r, and_(r.name == d.model, r.version == d.version))
        .outerjoin(v, and_(v.release_id == r.id, v.variant == d.variant))
        .where(d.device_id == device_id)
        .order_by(d.model)
    )
    artifacts = tuple(DesiredArtifact(*row) for row in session.execute(stmt))
    revision = device_revision(session, device_id)
    return DesiredSet(device_id, device.profile, device.revoked_at, artifacts, revision)
