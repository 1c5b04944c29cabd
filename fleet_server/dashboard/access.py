"""Who is looking: the session user, CSRF-checked forms, and the route class that turns
errors into HTML pages (or a redirect to the login form).

Every page re-reads the session's API token from the database, so the role shown is the
token's current role and a revoked or expired token logs the user out. Every POST checks
the form's CSRF secret against the session's, then the role, whatever the page showed.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import RedirectResponse, Response
from fastapi.routing import APIRoute
from sqlalchemy.exc import DBAPIError
from starlette.datastructures import FormData

from fleet_server.api.deps import Services
from fleet_server.auth import TOUCH_EVERY, Principal, check_token
from fleet_server.domain import Role, as_utc, utcnow
from fleet_server.errors import AuthError, FleetError, Forbidden, ValidationError
from fleet_server.store import tokens
from fleet_server.store.engine import translate

from .render import render, secure
from .session import SESSION_COOKIE, SessionCodec, SessionData, same_secret

log = logging.getLogger("fleet_server.dashboard")
#: Form posts larger than this are refused before parsing.
MAX_FORM_BYTES = 64 * 1024


@dataclass(frozen=True)
class User:
    """A logged-in dashboard user: the token's principal and the session's CSRF secret."""

    principal: Principal
    csrf: str

    @property
    def name(self) -> str:
        return self.principal.name

    @property
    def role(self) -> Role:
        return self.principal.role

    @property
    def can_operate(self) -> bool:
        """Operators and admins see and may use the action buttons."""
        return self.role.allows(Role.OPERATOR)


class LoginRequired(Exception):
    """No valid session: the page answers with a redirect to the login form."""


def services_of(request: Request) -> Services:
    """The app's services."""
    svc: Services = request.app.state.services
    return svc


def codec_of(request: Request) -> SessionCodec:
    """The session codec installed by :func:`fleet_server.dashboard.mount_dashboard`."""
    codec: SessionCodec = request.app.state.dashboard_codec
    return codec


def session_user(request: Request) -> User | None:
    """The user of the request's session, or ``None`` (no, forged, expired or revoked).

    Raises:
        StoreUnavailable: the database cannot be reached.
    """
    now = utcnow()
    data: SessionData | None = codec_of(request).decode(request.cookies.get(SESSION_COOKIE), now)
    if data is None:
        return None
    db = services_of(request).db
    with db.read() as session:
        hit = tokens.find_api_token(session, data.token_hash)
    if hit is None or not hmac.compare_digest(hit[1], data.token_hash):
        return None
    try:
        token = check_token(hit[0], now)
    except AuthError:
        return None
    if token.last_used_at is None or now - as_utc(token.last_used_at) > TOUCH_EVERY:
        with db.write() as session:
            tokens.touch_api_token(session, token.id, now)
    return User(Principal(name=token.name, role=token.role, token_id=token.id), data.csrf)


def current_user(request: Request) -> User:
    """The logged-in user (a dependency).

    Raises:
        LoginRequired: no valid session (pages redirect to the login form).
    """
    user = session_user(request)
    if user is None:
        raise LoginRequired()
    return user


def api_user(request: Request) -> User:
    """The logged-in user, for fragments and posts: no redirect (a dependency).

    Raises:
        AuthError: no valid session (401).
    """
    user = session_user(request)
    if user is None:
        raise AuthError("log in to the dashboard first", code="login_required")
    return user


UserDep = Annotated[User, Depends(current_user)]
ApiUserDep = Annotated[User, Depends(api_user)]


async def checked_form(request: Request, user: User, needed: Role = Role.OPERATOR) -> FormData:
    """The posted form, once its CSRF secret matches the session's and the user's role is
    at least ``needed`` (checked here, whatever the page showed).

    Raises:
        Forbidden: a missing or wrong CSRF secret (``csrf_failed``), a form too large, or
            a role that is too small (``forbidden``).
    """
    length = request.headers.get("content-length")
    if length is not None and (not length.isdigit() or int(length) > MAX_FORM_BYTES):
        raise Forbidden("the form is too large", code="form_too_large")
    form = await request.form(max_files=0, max_fields=50)
    presented = form.get("csrf")
    if not isinstance(presented, str) or not same_secret(user.csrf, presented):
        log.warning("dashboard: refused a form without a valid CSRF secret from %s", user.name)
        raise Forbidden("the form's CSRF check failed; reload the page", code="csrf_failed")
    user.principal.require(needed)
    return form


def require_role(user: User, needed: Role) -> None:
    """Check the role of a page's user.

    Raises:
        Forbidden: the role is smaller than ``needed``.
    """
    user.principal.require(needed)


def _login_redirect(request: Request) -> Response:
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    base = request.scope.get("root_path", "")
    response = RedirectResponse(f"{base}/login?next={quote(target, safe='/')}", status_code=303)
    return secure(response)


def error_page(request: Request, exc: FleetError) -> Response:
    """The HTML page of an error: its status, code and one-line message."""
    return render(
        request,
        "error.html",
        {"code": exc.code, "message": exc.message, "status": exc.status, "title": "Error"},
        status=exc.status,
    )


class PageRoute(APIRoute):
    """Routes whose errors answer as HTML pages (and a missing login as a redirect)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired:
                return _login_redirect(request)
            except FleetError as exc:
                return error_page(request, exc)
            except RequestValidationError as exc:
                first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid"}
                where = ".".join(str(p) for p in first["loc"][1:]) or "request"
                return error_page(request, ValidationError(f"{where}: {first['msg']}"))
            except DBAPIError as exc:
                return error_page(request, translate(exc))

        return route
