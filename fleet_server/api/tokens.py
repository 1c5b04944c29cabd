"""Operator API token routes (admin only). Secrets are returned once, at creation."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter

from fleet_server.api.deps import Admin, ServicesDep
from fleet_server.api.schemas import ERRORS, ApiTokenCreated, ApiTokenIn, ApiTokenOut
from fleet_server.auth import mint
from fleet_server.domain import utcnow
from fleet_server.store import tokens

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"], responses=ERRORS)


@router.post("", status_code=201, response_model=ApiTokenCreated, summary="Create a token")
def create_token(body: ApiTokenIn, svc: ServicesDep, who: Admin) -> ApiTokenCreated:
    """A new operator token; ``token`` is shown only in this response."""
    secret = mint()
    expires = utcnow() + timedelta(seconds=body.expires_in_s) if body.expires_in_s else None
    with svc.db.write() as session:
        record = tokens.create_api_token(
            session,
            name=body.name,
            role=body.role,
            token_hash=secret.hash,
            prefix=secret.prefix,
            actor=who.actor,
            expires_at=expires,
        )
    return ApiTokenCreated(**ApiTokenOut.of(record).model_dump(), token=secret.token)


@router.get("", response_model=list[ApiTokenOut], summary="List tokens")
def list_tokens(svc: ServicesDep, _: Admin, include_revoked: bool = False) -> list[ApiTokenOut]:
    """Every token (without secrets), oldest first."""
    with svc.db.read() as session:
        found = tokens.list_api_tokens(session, include_revoked=include_revoked)
    return [ApiTokenOut.of(t) for t in found]


@router.delete("/{token_id}", response_model=ApiTokenOut, summary="Revoke a token")
def revoke_token(token_id: int, svc: ServicesDep, who: Admin) -> ApiTokenOut:
    """Revoke a token; it is refused from the next request on."""
    with svc.db.write() as session:
        return ApiTokenOut.of(tokens.revoke_api_token(session, token_id, actor=who.actor))
