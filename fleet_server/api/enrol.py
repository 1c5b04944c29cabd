"""Enrolment routes: operators mint single-use tokens; devices redeem them."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter, Request

from fleet_server.api.deps import Operator, ServicesDep
from fleet_server.api.schemas import (
    ERRORS,
    EnrolIn,
    EnrolmentTokenCreated,
    EnrolmentTokenIn,
    EnrolmentTokenOut,
    EnrolOut,
    ErrorResponse,
)
from fleet_server.domain import TAG_KEY_RE, TAG_VALUE_MAX
from fleet_server.errors import ValidationError
from fleet_server.store import tokens

router = APIRouter(tags=["enrolment"], responses=ERRORS)


@router.post(
    "/api/v1/enrolment-tokens",
    status_code=201,
    response_model=EnrolmentTokenCreated,
    summary="Create an enrolment token",
)
def create_enrolment_token(
    body: EnrolmentTokenIn, svc: ServicesDep, who: Operator
) -> EnrolmentTokenCreated:
    """A short-lived, single-use token; the device it enrols gets ``tags``. The secret is
    shown only in this response and stored only as a hash."""
    for key, value in body.tags.items():
        if not TAG_KEY_RE.match(key) or len(value) > TAG_VALUE_MAX:
            raise ValidationError(f"tags.{key}: bad tag key or value too long", code="bad_tag")
    secret, record = svc.enrolment.create_token(
        tags=body.tags, ttl=timedelta(seconds=body.expires_in_s), actor=who.actor
    )
    return EnrolmentTokenCreated(**EnrolmentTokenOut.of(record).model_dump(), token=secret)


@router.get(
    "/api/v1/enrolment-tokens",
    response_model=list[EnrolmentTokenOut],
    summary="List enrolment tokens",
)
def list_enrolment_tokens(
    svc: ServicesDep, _: Operator, include_used: bool = False
) -> list[EnrolmentTokenOut]:
    """Unused tokens (or all), newest first; never the secrets."""
    with svc.db.read() as session:
        found = tokens.list_enrolment_tokens(session, include_used=include_used)
    return [EnrolmentTokenOut.of(t) for t in found]


@router.post(
    "/api/v1/enroll",
    response_model=EnrolOut,
    summary="Enrol a device (redeem a token)",
    responses={
        409: {"model": ErrorResponse, "description": "token used, or device enrolled"},
        422: {"model": ErrorResponse, "description": "bad CSR or facts"},
    },
)
def enroll(body: EnrolIn, request: Request, svc: ServicesDep) -> EnrolOut:
    """Called by a device with no credentials but the token. Returns its signed client
    certificate, the CA certificate, the broker URL and the update trust root."""
    result = svc.enrolment.enrol(
        token=body.token,
        csr_pem=body.csr_pem,
        facts=body.facts,
        server_url=str(request.base_url).rstrip("/"),
    )
    return EnrolOut(**result.__dict__)
