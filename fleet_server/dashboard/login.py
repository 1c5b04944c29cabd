"""Logging in with an API token, and out.

The login form posts the token once; the server checks it like a bearer token and
answers with the signed session cookie (HttpOnly, SameSite=Strict, ``Secure`` over
HTTPS). The form itself carries a double-submit nonce (a cookie and a hidden field that
must match), so another site cannot log a browser in under its own token.
"""

from __future__ import annotations

import secrets
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from fleet_server.auth import authenticate, hash_token
from fleet_server.domain import Role, utcnow
from fleet_server.errors import AuthError, Forbidden

from .access import PageRoute, UserDep, checked_form, codec_of, services_of, session_user
from .render import render, secure
from .session import LOGIN_COOKIE, SESSION_COOKIE, SESSION_TTL, safe_next, same_secret

router = APIRouter(route_class=PageRoute, include_in_schema=False)
_LOGIN_TTL_S = 3600
_MAX_TOKEN_CHARS = 256


def _https(request: Request) -> bool:
    return request.url.scheme == "https"


def _login_form(
    request: Request, next_path: str, *, error: str | None = None, status: int = 200
) -> Response:
    nonce = secrets.token_urlsafe(24)
    response = render(
        request,
        "login.html",
        {"title": "Log in", "nonce": nonce, "next": next_path, "error": error},
        status=status,
    )
    response.set_cookie(
        LOGIN_COOKIE,
        nonce,
        max_age=_LOGIN_TTL_S,
        path=f"{request.scope.get('root_path', '')}/login",
        httponly=True,
        samesite="strict",
        secure=_https(request),
    )
    return response


@router.get("/login", summary="The login form")
def login_form(request: Request, next: str = "/") -> Response:
    """The form; a user who is logged in already goes on to ``next``."""
    if session_user(request) is not None:
        return secure(RedirectResponse(safe_next(next), status_code=303))
    return _login_form(request, safe_next(next))


@router.post("/login", summary="Log in with an API token")
async def login(request: Request) -> Response:
    """Check the token and start a session.

    Raises:
        Forbidden: the form's nonce does not match its cookie (``csrf_failed``).
    """
    form = await request.form(max_files=0, max_fields=10)
    nonce, token, next_raw = form.get("nonce"), form.get("token"), form.get("next")
    next_path = safe_next(next_raw if isinstance(next_raw, str) else None)
    cookie = request.cookies.get(LOGIN_COOKIE)
    if not isinstance(nonce, str) or cookie is None or not same_secret(cookie, nonce):
        raise Forbidden("the login form expired or was not sent by this site", code="csrf_failed")
    if not isinstance(token, str) or not token.strip() or len(token) > _MAX_TOKEN_CHARS:
        return _login_form(request, next_path, error="Enter an API token.", status=401)
    token = token.strip()
    svc = services_of(request)
    try:
        authenticate(svc.db, token)
    except AuthError as exc:
        return _login_form(request, next_path, error=f"{exc.message}.", status=401)
    codec = codec_of(request)
    data = codec.new(hash_token(token), utcnow())
    base = request.scope.get("root_path", "")
    response = RedirectResponse(f"{base}{next_path}", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        codec.encode(data),
        max_age=int(SESSION_TTL.total_seconds()),
        path=f"{base}/",
        httponly=True,
        samesite="strict",
        secure=_https(request),
    )
    response.delete_cookie(LOGIN_COOKIE, path=f"{base}/login")
    return secure(response)


@router.post("/logout", summary="Log out")
async def logout(request: Request, user: UserDep) -> Response:
    """End the session (CSRF-checked like every post).

    Raises:
        Forbidden: the CSRF secret is missing or wrong.
    """
    await checked_form(request, user, needed=Role.VIEWER)
    base = request.scope.get("root_path", "")
    response = RedirectResponse(f"{base}/login?next={quote('/')}", status_code=303)
    response.delete_cookie(SESSION_COOKIE, path=f"{base}/")
    return secure(response)
