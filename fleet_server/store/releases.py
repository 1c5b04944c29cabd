"""Model releases and their variants. A (name, version, variant) is immutable once stored."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.orm import Session

from fleet_server.domain import ArtifactKind, ModelRelease, Page, Variant, as_utc, utcnow
from fleet_server.errors import Conflict, NotFound
from fleet_server.store import audit
from fleet_server.store.cursor import decode_int, encode
from fleet_server.store.models import ReleaseRow, VariantRow


def _variant(row: VariantRow) -> Variant:
    return Variant(
        variant=row.variant,
        kind=ArtifactKind(row.kind),
        format=row.format,
        sha256=row.sha256,
        size=row.size,
        filename=row.filename,
        manifest=dict(row.manifest or {}),
        created_at=as_utc(row.created_at),
        created_by=row.created_by,
    )


def _releases(session: Session, rows: list[ReleaseRow]) -> list[ModelRelease]:
    variants: dict[int, list[Variant]] = defaultdict(list)
    ids = [r.id for r in rows]
    if ids:
        stmt = select(VariantRow).where(VariantRow.release_id.in_(ids)).order_by(VariantRow.variant)
        for v in session.scalars(stmt):
            variants[v.release_id].append(_variant(v))
    return [
        ModelRelease(
            id=r.id,
            name=r.name,
            version=r.version,
            created_at=as_utc(r.created_at),
            created_by=r.created_by,
            variants=tuple(variants[r.id]),
        )
        for r in rows
    ]


def add_variant(
    session: Session,
    *,
    name: str,
    version: str,
    variant: str,
    kind: ArtifactKind,
    format: str,
    sha256: str,
    size: int,
    filename: str,
    manifest: dict[str, Any],
    actor: str,
) -> ModelRelease:
    """Store a variant of ``name`` ``version``, creating the release on its first variant;
    audited.

    Raises:
        Conflict: this release already has this variant (``release_exists``); releases are
            immutable: publish a new version instead.
    """
    now = utcnow()
    release = session.scalar(
        select(ReleaseRow).where(ReleaseRow.name == name, ReleaseRow.version == version)
    )
    if release is None:
        release = ReleaseRow(name=name, version=version, created_at=now, created_by=actor)
        session.add(release)
        session.flush()
    elif session.scalar(
        select(exists().where(VariantRow.release_id == release.id, VariantRow.variant == variant))
    ):
        raise Conflict(
            f"{name} {version} already has a variant {variant!r}; releases are immutable",
            code="release_exists",
        )
    session.add(
        VariantRow(
            release_id=release.id,
            variant=variant,
            kind=kind.value,
            format=format,
            sha256=sha256,
            size=size,
            filename=filename,
            manifest=manifest,
            created_at=now,
            created_by=actor,
        )
    )
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="release.publish",
        target_type="release",
        target_id=f"{name}@{version}",
        after={"variant": variant, "kind": kind.value, "format": format, "sha256": sha256},
    )
    return _releases(session, [release])[0]


def get_release(session: Session, name: str, version: str) -> ModelRelease:
    """One release with its variants.

    Raises:
        NotFound: there is no such release.
    """
    row = session.scalar(
        select(ReleaseRow).where(ReleaseRow.name == name, ReleaseRow.version == version)
    )
    if row is None:
        raise NotFound(f"no release {name} {version}")
    return _releases(session, [row])[0]


def list_releases(
    session: Session, *, name: str | None = None, limit: int = 100, cursor: str | None = None
) -> Page[ModelRelease]:
    """Releases, newest first, optionally of one model; keyset-paginated.

    Raises:
        ValidationError: the cursor is malformed.
    """
    stmt = select(ReleaseRow).order_by(ReleaseRow.id.desc()).limit(limit + 1)
    if name is not None:
        stmt = stmt.where(ReleaseRow.name == name)
    if cursor is not None:
        stmt = stmt.where(ReleaseRow.id < decode_int(cursor))
    rows = list(session.scalars(stmt))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page(_releases(session, rows), encode(rows[-1].id) if more and rows else None)


def artifact_referenced(session: Session, sha256: str) -> bool:
    """True when some release variant points at this artifact."""
    return bool(session.scalar(select(exists().where(VariantRow.sha256 == sha256))))
