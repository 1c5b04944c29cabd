"""HTTP for the simulated devices: TUF metadata, artifacts, and their trust roots.

A virtual device verifies its updates with the agent's own
:class:`~agent.updater.verify.UpdateVerifier` (two python-tuf ngclient updaters: the
image repository and the device's director), so the server answers exactly the requests
a real agent sends. Only the transport differs: :class:`HttpFetcher` keeps one
keep-alive ``http.client`` connection per worker thread and server (a third of the
simulator's CPU went to httpx's request machinery when it used httpx), so one simulator
process can drive thousands of devices' checks.
"""

from __future__ import annotations

import http.client
import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from tuf.api.exceptions import DownloadError, DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

from agent.errors import UpdateError
from fleet_server.errors import ServerUnreachable

USER_AGENT = "edge-fleet-simulator"
#: Biggest body accepted (metadata and the simulator's tiny artifacts are far smaller).
MAX_BODY = 512 * 2**20


class HttpError(OSError):
    """The request failed on the way (connection refused or reset, a timeout, a
    malformed answer)."""


@dataclass(frozen=True)
class HttpResponse:
    """A whole answer."""

    status_code: int
    content: bytes


class HttpFetcher(FetcherInterface):
    """ngclient's network seam, and artifact downloads, over ``http.client``
    (thread-safe: one connection per thread and server)."""

    def __init__(self, *, timeout_s: float = 30.0, ca_file: Path | None = None) -> None:
        self._timeout = timeout_s
        self._ssl = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[http.client.HTTPConnection] = []
        self.requests = 0
        self.errors = 0

    def _connection(self, scheme: str, netloc: str, fresh: bool) -> http.client.HTTPConnection:
        conns: dict[tuple[str, str], http.client.HTTPConnection] | None = getattr(
            self._local, "conns", None
        )
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get((scheme, netloc))
        if conn is not None and not fresh:
            return conn
        if conn is not None:
            conn.close()
        if scheme == "https":
            conn = http.client.HTTPSConnection(netloc, timeout=self._timeout, context=self._ssl)
        elif scheme == "http":
            conn = http.client.HTTPConnection(netloc, timeout=self._timeout)
        else:
            raise HttpError(f"unsupported URL scheme {scheme!r}")
        conns[(scheme, netloc)] = conn
        with self._lock:
            self._all.append(conn)
        return conn

    def _count(self, ok: bool) -> None:
        with self._lock:
            self.requests += 1
            self.errors += 0 if ok else 1

    def get(self, url: str) -> HttpResponse:
        """One GET, counted. A kept-alive connection the server closed meanwhile is
        reopened and the GET sent again once (GETs are idempotent).

        Raises:
            HttpError: the connection failed or timed out, or the answer was malformed.
        """
        parts = urlsplit(url)
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}
        for attempt in (0, 1):
            conn = self._connection(parts.scheme, parts.netloc, fresh=attempt > 0)
            try:
                conn.request("GET", target or "/", headers=headers)
                answer = conn.getresponse()
                body = answer.read(MAX_BODY + 1)
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
                conn.close()
                if attempt == 0:
                    continue
                self._count(False)
                raise HttpError(f"{url}: the server closed the connection") from None
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                self._count(False)
                raise HttpError(f"{url}: {exc or type(exc).__name__}") from None
            if len(body) > MAX_BODY:
                conn.close()
                self._count(False)
                raise HttpError(f"{url}: the answer is larger than {MAX_BODY} bytes")
            if answer.will_close:
                conn.close()
            self._count(answer.status < 400 or answer.status == 404)
            return HttpResponse(answer.status, body)
        raise AssertionError("unreachable")

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self.get(url)
        except HttpError as exc:
            raise DownloadError(str(exc)) from None
        if response.status_code != 200:
            raise DownloadHTTPError(f"{url}: HTTP {response.status_code}", response.status_code)
        return iter((response.content,))

    def download(self, url: str) -> bytes:
        """The artifact at ``url`` (the caller checks it against the signed metadata).

        Raises:
            UpdateError: ``download_failed``: an HTTP error, or the server is unreachable.
        """
        try:
            response = self.get(url)
        except HttpError as exc:
            raise UpdateError(str(exc), code="download_failed") from None
        if response.status_code != 200:
            raise UpdateError(f"{url}: HTTP {response.status_code}", code="download_failed")
        return response.content

    def close(self) -> None:
        """Close every thread's connections."""
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()


@dataclass(frozen=True)
class TrustRoots:
    """The two trust anchors of the devices: the image repository's and the director's root."""

    image: bytes
    director: bytes

    @classmethod
    def from_enrolment(cls, answer: dict[str, Any]) -> TrustRoots | None:
        """The roots an enrolment answer carries (None when the server has no repositories)."""
        image, director = answer.get("trust_root"), answer.get("director_root")
        if not image or not director:
            return None
        return cls(json.dumps(image).encode(), json.dumps(director).encode())

    @classmethod
    def first_use(cls, fetcher: HttpFetcher, server_url: str, device_id: str) -> TrustRoots:
        """Trust on first use: the roots the server serves now (``auto`` registration,
        where no enrolment hands them over; a real device never does this).

        Raises:
            ServerUnreachable: the server cannot be reached or has no repositories.
        """
        urls = (
            f"{server_url}/tuf/image/root.json",
            f"{server_url}/tuf/director/{device_id}/root.json",
        )
        found = []
        for url in urls:
            try:
                response = fetcher.get(url)
            except HttpError as exc:
                raise ServerUnreachable(str(exc)) from None
            if response.status_code != 200:
                raise ServerUnreachable(
                    f"{url}: HTTP {response.status_code}: the server has no update "
                    "repositories (edge-fleet keys init), or does not know the device yet"
                )
            found.append(response.content)
        return cls(found[0], found[1])
