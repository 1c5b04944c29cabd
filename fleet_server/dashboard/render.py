"""Rendering: the Jinja2 environment, its filters, and HTML responses with the
dashboard's security headers (a strict Content-Security-Policy: only this server's own
scripts and styles, no inline script, no framing)."""

from __future__ import annotations

import json
from datetime import datetime
from functools import cache
from typing import Any
from urllib.parse import urlencode

import jinja2
from fastapi import Request
from fastapi.responses import HTMLResponse, Response

import fleet_server
from fleet_server.domain import as_utc, utcnow

_CSP_REST = (
    "img-src 'self' data:",
    "connect-src 'self'",
    "font-src 'self'",
    "object-src 'none'",
    "base-uri 'none'",
    "form-action 'self'",
    "frame-ancestors 'none'",
)
CSP = "; ".join(("default-src 'self'", "script-src 'self'", "style-src 'self'", *_CSP_REST))
#: Pages with charts: plotly.js writes inline styles (its own rules and SVG style
#: attributes), so those pages allow inline *styles*; scripts stay 'self' only.
CHART_CSP = "; ".join(
    ("default-src 'self'", "script-src 'self'", "style-src 'self' 'unsafe-inline'", *_CSP_REST)
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


def fmt_ts(value: datetime | None) -> str:
    """``2025-01-02 13:04:05 UTC`` (or an en dash for nothing)."""
    if value is None:
        return "\N{EN DASH}"
    return as_utc(value).strftime("%Y-%m-%d %H:%M:%S UTC")


def fmt_iso(value: datetime | None) -> str:
    """The machine-readable form for ``<time datetime=...>``."""
    return as_utc(value).isoformat() if value is not None else ""


def fmt_ago(value: datetime | None, now: datetime | None = None) -> str:
    """How long ago, coarsely: ``12 s ago``, ``5 min ago``, ``3 h ago``, ``2 d ago``."""
    if value is None:
        return "never"
    seconds = int(((now or utcnow()) - as_utc(value)).total_seconds())
    if seconds < 0:
        return "just now"
    for unit, size in (("d", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds // size} {unit} ago"
    return f"{seconds} s ago"


def fmt_bytes(value: float | None) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 MiB``."""
    if value is None:
        return "\N{EN DASH}"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(size) < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"  # pragma: no cover - the loop always returns


def fmt_num(value: int | float) -> str:
    """A count with thousands separators."""
    return f"{value:,}"


def fmt_json(value: Any) -> str:
    """Compact, key-sorted JSON for before/after pictures and facts."""
    return json.dumps(value, sort_keys=True, separators=(", ", ": "), default=str)


def query(params: dict[str, Any], **over: Any) -> str:
    """A query string from ``params`` with ``over`` applied; empty values are left out."""
    merged = {**params, **over}
    pairs = [(k, str(v)) for k, v in merged.items() if v is not None and v != ""]
    return "?" + urlencode(pairs) if pairs else "?"


@cache
def environment() -> jinja2.Environment:
    """The template environment (autoescaping on; unknown names are errors)."""
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("fleet_server.dashboard", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters.update(
        ts=fmt_ts, iso=fmt_iso, ago=fmt_ago, bytes=fmt_bytes, num=fmt_num, json=fmt_json
    )
    env.globals.update(version=fleet_server.__version__, query=query)
    return env


def secure(response: Response, *, charts: bool = False) -> Response:
    """``response`` with the dashboard's security headers (``charts``: the CSP that lets
    plotly.js style its charts)."""
    response.headers.update(SECURITY_HEADERS)
    if charts:
        response.headers["Content-Security-Policy"] = CHART_CSP
    return response


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    status: int = 200,
    charts: bool = False,
) -> HTMLResponse:
    """A template rendered into an HTML response with the security headers.

    ``context`` should hold ``user`` (or ``None``) and ``active`` (the nav entry).
    """
    base = request.scope.get("root_path", "")
    full = {"base": base, "path": request.url.path, "active": "", "user": None, **context}
    html = environment().get_template(template).render(full)
    response = HTMLResponse(html, status_code=status)
    secure(response, charts=charts)
    return response
