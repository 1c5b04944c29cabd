"""Operator authentication: high-entropy bearer tokens stored only as sha256 hashes.

A token is ``eft_`` + 43 url-safe characters (256 random bits); enrolment tokens use
``efe_``. The database holds ``sha256(token)`` and the first 12 characters (to tell tokens
apart in listings). A lookup is by hash (an indexed equality), confirmed with a
constant-time compare. Roles are ordered ``viewer < operator < admin``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from fleet_server.domain import ApiToken, Role, as_utc, utcnow
from fleet_server.errors import AuthError, Forbidden, TokenExpired
from fleet_server.store import tokens
from fleet_server.store.engine import Database

API_TOKEN_PREFIX = "eft_"
ENROLMENT_TOKEN_PREFIX = "efe_"
DISPLAY_CHARS = 12
#: ``last_used_at`` is written at most this often per token.
TOUCH_EVERY = timedelta(minutes=1)


@dataclass(frozen=True)
class NewSecret:
    """A freshly minted secret: show ``token`` once, store ``hash`` and ``prefix``."""

    token: str
    hash: str
    prefix: str


def hash_token(token: str) -> str:
    """The stored form of a token: lowercase hex sha256."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def mint(kind_prefix: str = API_TOKEN_PREFIX) -> NewSecret:
    """A new random token of the given kind."""
    token = kind_prefix + secrets.token_urlsafe(32)
    return NewSecret(token=token, hash=hash_token(token), prefix=token[:DISPLAY_CHARS])


@dataclass(frozen=True)
class Principal:
    """Who is calling: a named operator token with a role."""

    name: str
    role: Role
    token_id: int | None = None

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        if self.token_id is None:
            return f"token:{self.name}"
        return f"token:{self.name}#{self.token_id}"

    def require(self, needed: Role) -> None:
        """Check the role.

        Raises:
            Forbidden: the role is smaller than ``needed``.
        """
        if not self.role.allows(needed):
            raise Forbidden(f"this needs the {needed.value} role; token has {self.role.value}")


def bearer_token(authorization: str | None) -> str:
    """The token in an ``Authorization: Bearer ...`` header.

    Raises:
        AuthError: the header is missing or not a bearer token.
    """
    if not authorization:
        raise AuthError("missing Authorization: Bearer <token> header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("expected Authorization: Bearer <token>")
    return token.strip()


def check_token(found: ApiToken | None, now: datetime) -> ApiToken:
    """Validate a looked-up token; returns it.

    Raises:
        AuthError: unknown or revoked.
        TokenExpired: past its expiry.
    """
    if found is None:
        raise AuthError("unknown API token")
    if found.revoked_at is not None:
        raise AuthError("this API token was revoked", code="token_revoked")
    if found.expires_at is not None and as_utc(found.expires_at) <= now:
        raise TokenExpired("this API token has expired")
    return found


def authenticate(db: Database, token: str, *, now: datetime | None = None) -> Principal:
    """The principal behind a bearer token.

    Raises:
        AuthError: unknown or revoked token.
        TokenExpired: expired token.
        StoreUnavailable: the database cannot be reached.
    """
    now = as_utc(now or utcnow())
    presented = hash_token(token)
    with db.read() as session:
        hit = tokens.find_api_token(session, presented)
    found = None
    # Found by an indexed equality on the hash; confirm with a constant-time compare.
    if hit is not None and hmac.compare_digest(hit[1], presented):
        found = hit[0]
    found = check_token(found, now)
    if found.last_used_at is None or now - as_utc(found.last_used_at) > TOUCH_EVERY:
        with db.write() as session:
            tokens.touch_api_token(session, found.id, now)
    return Principal(name=found.name, role=found.role, token_id=found.id)
