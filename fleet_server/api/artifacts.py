"""Artifact downloads, resumable (HTTP Range), from the content-addressed store.

    GET /artifacts/sha256/{hex}                         by digest
    GET /tuf/image/targets/{dir}/{hex}.{file}           TUF consistent-snapshot target name
    GET /tuf/targets/{dir}/{hex}.{file}                 the same, shorter

``{dir}/{file}`` is the signed target path (``models/{name}/{version}/{variant}/{file}``);
the bytes are found by the digest alone, and the device checks them against the signed
length and hashes. No API token: artifacts are only useful with signed metadata naming
them. Every answer carries ``Accept-Ranges: bytes`` and ``ETag: "{sha256}"``; a single
range (``bytes=a-b``, ``a-``, ``-n``) answers 206 with ``Content-Range``, one that starts
past the end answers 416 with ``Content-Range: bytes */{size}``. Several ranges, or an
``If-Range`` that is not the ETag, get the whole artifact (200), as RFC 9110 allows.

The handlers are coroutines: a body of at most ``CHUNK`` bytes is read at once and sent
without a worker thread (the common case for small models and resumed tails); larger
bodies stream from a worker thread in ``CHUNK`` pieces.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from agent.updater.targets import parse_model_target
from fleet_server.api.deps import ServicesDep
from fleet_server.api.schemas import ErrorResponse
from fleet_server.artifacts import ArtifactStore, check_digest
from fleet_server.errors import NotFound

router = APIRouter(
    tags=["updates"],
    responses={404: {"model": ErrorResponse, "description": "no such artifact"}},
)

CHUNK = 256 * 1024
_RANGE_RE = re.compile(r"bytes=(\d*)-(\d*)")
_OCTETS = "application/octet-stream"
_DOC: dict[int | str, dict[str, Any]] = {
    200: {"content": {_OCTETS: {}}, "description": "the whole artifact"},
    206: {"content": {_OCTETS: {}}, "description": "the requested range"},
    416: {"model": ErrorResponse, "description": "the range starts past the end"},
}


class RangeNotSatisfiable(Exception):
    """The requested range lies outside the artifact."""


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """The byte range ``[start, end)`` that ``header`` asks for, or None for the whole file
    (no header, a malformed one, or several ranges: RFC 9110 lets a server ignore those).

    Raises:
        RangeNotSatisfiable: a single range that starts at or past ``size`` (or an empty
            suffix range).
    """
    if header is None:
        return None
    match = _RANGE_RE.fullmatch(header.strip().replace(" ", ""))
    if match is None:
        return None
    first, last = match[1], match[2]
    if not first and not last:
        return None
    if not first:  # the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            raise RangeNotSatisfiable
        return max(0, size - n), size
    start = int(first)
    if start >= size:
        raise RangeNotSatisfiable
    end = size if not last else min(int(last) + 1, size)
    if end <= start:
        return None  # last < first: not a valid range, serve the whole artifact
    return start, end


def _body(store: ArtifactStore, sha256: str, start: int, end: int) -> Iterator[bytes]:
    reader = store.open_range(sha256, start, end)
    try:
        remaining = end - start
        while remaining > 0:
            chunk = reader.read(min(CHUNK, remaining))
            if not chunk:
                return
            remaining -= len(chunk)
            yield chunk
    finally:
        reader.close()


def serve_artifact(svc: ServicesDep, request: Request, sha256: str) -> Response:
    """The artifact ``sha256``, whole or the range the request's ``Range`` asks for (GET
    and HEAD; ``If-Range`` and ``If-None-Match`` are honoured).

    Raises:
        NotFound: ``sha256`` is not a digest, or no such artifact is stored.
    """
    store = svc.artifacts
    size = store.size(check_digest(sha256))
    range_header = request.headers.get("range")
    if_range = request.headers.get("if-range")
    if_none_match = request.headers.get("if-none-match")
    etag = f'"{sha256}"'
    headers = {
        "Accept-Ranges": "bytes",
        "ETag": etag,
        "Cache-Control": "public, max-age=31536000, immutable",
    }
    if if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=304, headers=headers)
    if if_range is not None and if_range.strip() != etag:
        range_header = None  # the client's partial copy is of other bytes: send them all
    try:
        wanted = parse_range(range_header, size)
    except RangeNotSatisfiable:
        return JSONResponse(
            {
                "error": {
                    "code": "range_not_satisfiable",
                    "message": f"the artifact has {size} bytes",
                }
            },
            status_code=416,
            headers={**headers, "Content-Range": f"bytes */{size}"},
        )
    status, (start, end) = (200, (0, size)) if wanted is None else (206, wanted)
    headers["Content-Length"] = str(end - start)
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    if request.method == "HEAD":
        return Response(status_code=status, headers=headers, media_type=_OCTETS)
    if end - start <= CHUNK:
        body = b"".join(_body(store, sha256, start, end))
        if len(body) != end - start:
            raise NotFound(f"artifact {sha256} changed while being read")
        return Response(body, status_code=status, headers=headers, media_type=_OCTETS)
    return StreamingResponse(
        _body(store, sha256, start, end), status_code=status, headers=headers, media_type=_OCTETS
    )


async def artifact_by_digest(sha256: str, request: Request, svc: ServicesDep) -> Response:
    """The artifact with this sha256 (lowercase hex); supports Range."""
    return serve_artifact(svc, request, sha256)


def digest_of_target_name(name: str) -> str:
    """The sha256 in a consistent-snapshot target name ``{dir}/{sha256}.{file}``.

    Raises:
        NotFound: ``name`` is not laid out so, or its path is not a safe model target path.
    """
    folder, _, last = name.rpartition("/")
    digest, dot, file = last[:64], last[64:65], last[65:]
    if dot != "." or parse_model_target(f"{folder}/{file}") is None:
        raise NotFound(f"no target named {name[:200]!r}")
    return check_digest(digest)


async def artifact_by_target_name(name: str, request: Request, svc: ServicesDep) -> Response:
    """The artifact of ``models/{name}/{version}/{variant}/{sha256}.{file}``; supports Range."""
    sha256 = digest_of_target_name(name)
    return serve_artifact(svc, request, sha256)


def _register(path: str, endpoint: Callable[..., Any], operation: str, summary: str) -> None:
    """GET and HEAD of ``path`` (one OpenAPI operation id each)."""
    for method in ("GET", "HEAD"):
        router.add_api_route(
            path,
            endpoint,
            methods=[method],
            summary=summary if method == "GET" else f"{summary} (headers only)",
            operation_id=f"{operation}_{method.lower()}",
            response_class=Response,
            responses=_DOC,
        )


_register("/artifacts/sha256/{sha256}", artifact_by_digest, "artifact", "Download an artifact")
_register(
    "/tuf/image/targets/{name:path}",
    artifact_by_target_name,
    "target",
    "Download a target by its consistent-snapshot name",
)
_register(
    "/tuf/targets/{name:path}",
    artifact_by_target_name,
    "target_short",
    "Download a target (short path)",
)
