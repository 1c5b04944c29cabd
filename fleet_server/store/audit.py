"""The audit log: every mutation records who did what, when, and the before/after pictures.

Mutating repository functions call :func:`record` in their own transaction, so an audit
entry exists exactly when the change was committed.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.domain import AuditEntry, Page, as_utc, utcnow
from fleet_server.store.cursor import decode_int, encode
from fleet_server.store.models import AuditRow


def jsonable(value: Any) -> Any:
    """``value`` with datetimes as RFC 3339 strings, so it fits a JSON column."""
    if isinstance(value, datetime):
        return as_utc(value).isoformat()
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def record(
    session: Session,
    *,
    actor: str,
    action: str,
    target_type: str,
    target_id: str,
    before: dict[str, Any] | None = None,
    after: dict[str, Any] | None = None,
) -> None:
    """Add an audit entry to the current transaction."""
    session.add(
        AuditRow(
            ts=utcnow(),
            actor=actor,
            action=action,
            target_type=target_type,
            target_id=target_id,
            before=jsonable(before) if before is not None else None,
            after=jsonable(after) if after is not None else None,
        )
    )


def _entry(row: AuditRow) -> AuditEntry:
    return AuditEntry(
        id=row.id,
        ts=as_utc(row.ts),
        actor=row.actor,
        action=row.action,
        target_type=row.target_type,
        target_id=row.target_id,
        before=row.before,
        after=row.after,
    )


def list_entries(
    session: Session,
    *,
    limit: int = 100,
    cursor: str | None = None,
    target_type: str | None = None,
    target_id: str | None = None,
    actor: str | None = None,
) -> Page[AuditEntry]:
    """Audit entries, newest first, filtered; keyset-paginated on the entry id.

    Raises:
        ValidationError: the cursor is not one this function produced.
    """
    stmt = select(AuditRow).order_by(AuditRow.id.desc()).limit(limit + 1)
    if cursor is not None:
        stmt = stmt.where(AuditRow.id < decode_int(cursor))
    if target_type is not None:
        stmt = stmt.where(AuditRow.target_type == target_type)
    if target_id is not None:
        stmt = stmt.where(AuditRow.target_id == target_id)
    if actor is not None:
        stmt = stmt.where(AuditRow.actor == actor)
    rows = list(session.scalars(stmt))
    more = len(rows) > limit
    rows = rows[:limit]
    return Page([_entry(r) for r in rows], encode(rows[-1].id) if more and rows else None)
