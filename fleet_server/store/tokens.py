"""Operator API tokens and device enrolment tokens. Only sha256 hashes of secrets are stored."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from fleet_server.domain import ApiToken, EnrolmentToken, Role, as_utc, utcnow
from fleet_server.errors import AuthError, Conflict, NotFound, TokenExpired
from fleet_server.store import audit
from fleet_server.store.models import ApiTokenRow, EnrolmentTokenRow


def _opt(value: datetime | None) -> datetime | None:
    return as_utc(value) if value is not None else None


def _api(row: ApiTokenRow) -> ApiToken:
    return ApiToken(
        id=row.id,
        name=row.name,
        role=Role(row.role),
        prefix=row.prefix,
        created_at=as_utc(row.created_at),
        created_by=row.created_by,
        expires_at=_opt(row.expires_at),
        revoked_at=_opt(row.revoked_at),
        last_used_at=_opt(row.last_used_at),
    )


def _api_picture(token: ApiToken) -> dict[str, Any]:
    return {
        "id": token.id,
        "name": token.name,
        "role": token.role.value,
        "prefix": token.prefix,
        "expires_at": token.expires_at,
        "revoked_at": token.revoked_at,
    }


def create_api_token(
    session: Session,
    *,
    name: str,
    role: Role,
    token_hash: str,
    prefix: str,
    actor: str,
    expires_at: datetime | None = None,
) -> ApiToken:
    """Store a new operator token (its hash) and audit it."""
    row = ApiTokenRow(
        name=name,
        role=role.value,
        token_hash=token_hash,
        prefix=prefix,
        created_at=utcnow(),
        created_by=actor,
        expires_at=_opt(expires_at),
    )
    session.add(row)
    session.flush()
    token = _api(row)
    audit.record(
        session,
        actor=actor,
        action="token.create",
        target_type="api_token",
        target_id=str(token.id),
        after=_api_picture(token),
    )
    return token


def find_api_token(session: Session, token_hash: str) -> tuple[ApiToken, str] | None:
    """The token with this hash (revoked or not) and its stored hash; ``None`` if none."""
    row = session.scalar(select(ApiTokenRow).where(ApiTokenRow.token_hash == token_hash))
    return (_api(row), row.token_hash) if row is not None else None


def touch_api_token(session: Session, token_id: int, when: datetime) -> None:
    """Record that the token was used at ``when`` (not audited: it is not a mutation)."""
    session.execute(
        update(ApiTokenRow).where(ApiTokenRow.id == token_id).values(last_used_at=as_utc(when))
    )


def list_api_tokens(session: Session, *, include_revoked: bool = False) -> list[ApiToken]:
    """Every operator token, oldest first."""
    stmt = select(ApiTokenRow).order_by(ApiTokenRow.id)
    if not include_revoked:
        stmt = stmt.where(ApiTokenRow.revoked_at.is_(None))
    return [_api(r) for r in session.scalars(stmt)]


def revoke_api_token(session: Session, token_id: int, *, actor: str) -> ApiToken:
    """Revoke a token (idempotent) and audit it.

    Raises:
        NotFound: no token has this id.
    """
    row = session.get(ApiTokenRow, token_id)
    if row is None:
        raise NotFound(f"no API token with id {token_id}")
    before = _api(row)
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    after = _api(row)
    audit.record(
        session,
        actor=actor,
        action="token.revoke",
        target_type="api_token",
        target_id=str(token_id),
        before=_api_picture(before),
        after=_api_picture(after),
    )
    return after


def _enrolment(row: EnrolmentTokenRow) -> EnrolmentToken:
    return EnrolmentToken(
        id=row.id,
        prefix=row.prefix,
        tags=dict(row.tags or {}),
        created_at=as_utc(row.created_at),
        created_by=row.created_by,
        expires_at=as_utc(row.expires_at),
        used_at=_opt(row.used_at),
        used_by=row.used_by,
    )


def create_enrolment_token(
    session: Session,
    *,
    token_hash: str,
    prefix: str,
    tags: dict[str, str],
    expires_at: datetime,
    actor: str,
) -> EnrolmentToken:
    """Store a new single-use enrolment token (its hash) and audit it."""
    row = EnrolmentTokenRow(
        token_hash=token_hash,
        prefix=prefix,
        tags=dict(tags),
        created_at=utcnow(),
        created_by=actor,
        expires_at=as_utc(expires_at),
    )
    session.add(row)
    session.flush()
    token = _enrolment(row)
    audit.record(
        session,
        actor=actor,
        action="enrolment_token.create",
        target_type="enrolment_token",
        target_id=str(token.id),
        after={"prefix": prefix, "tags": tags, "expires_at": token.expires_at},
    )
    return token


def redeem_enrolment_token(
    session: Session, token_hash: str, *, device_id: str, now: datetime | None = None
) -> EnrolmentToken:
    """Mark the token used by ``device_id``, atomically: of two concurrent redeemers, one wins.

    Raises:
        AuthError: no token has this hash.
        TokenExpired: the token expired before it was used.
        Conflict: the token was already used (``token_used``).
    """
    now = as_utc(now or utcnow())
    result = session.execute(
        update(EnrolmentTokenRow)
        .where(
            EnrolmentTokenRow.token_hash == token_hash,
            EnrolmentTokenRow.used_at.is_(None),
            EnrolmentTokenRow.expires_at > now,
        )
        .values(used_at=now, used_by=device_id)
    )
    stmt = select(EnrolmentTokenRow).where(EnrolmentTokenRow.token_hash == token_hash)
    row = session.scalar(stmt)
    if row is None:
        raise AuthError("unknown enrolment token", code="bad_enrolment_token")
    if getattr(result, "rowcount", 0) != 1:
        if row.used_at is not None:
            raise Conflict("this enrolment token was already used", code="token_used")
        raise TokenExpired("this enrolment token has expired")
    session.refresh(row)
    return _enrolment(row)


def list_enrolment_tokens(session: Session, *, include_used: bool = False) -> list[EnrolmentToken]:
    """Enrolment tokens, newest first (unused ones only unless ``include_used``)."""
    stmt = select(EnrolmentTokenRow).order_by(EnrolmentTokenRow.id.desc())
    if not include_used:
        stmt = stmt.where(EnrolmentTokenRow.used_at.is_(None))
    return [_enrolment(r) for r in session.scalars(stmt)]
