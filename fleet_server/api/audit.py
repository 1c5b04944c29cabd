"""The audit log route (operators and admins)."""

from __future__ import annotations

from fastapi import APIRouter

from fleet_server.api.deps import Operator, ServicesDep
from fleet_server.api.params import Cursor, Limit
from fleet_server.api.schemas import ERRORS, AuditOut, AuditPage
from fleet_server.store import audit

router = APIRouter(prefix="/api/v1/audit", tags=["audit"], responses=ERRORS)


@router.get("", response_model=AuditPage, summary="Read the audit log")
def read_audit(
    *,
    svc: ServicesDep,
    _: Operator,
    target_type: str | None = None,
    target_id: str | None = None,
    actor: str | None = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> AuditPage:
    """Every mutation, newest first: who, what, when, and the before/after pictures."""
    with svc.db.read() as session:
        page = audit.list_entries(
            session,
            limit=limit,
            cursor=cursor,
            target_type=target_type,
            target_id=target_id,
            actor=actor,
        )
    return AuditPage(
        items=[AuditOut(**e.__dict__) for e in page.items], next_cursor=page.next_cursor
    )
