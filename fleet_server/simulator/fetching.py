"""HTTP for the simulated devices: TUF metadata, artifacts, and their trust roots.

A virtual device verifies its updates with the agent's own
:class:`~agent.updater.verify.UpdateVerifier` (two python-tuf ngclient updaters: the
image repository and the device's director), so the server answers exactly the requests
a real agent sends. Only the transport differs: :class:`HttpFetcher` keeps one
keep-alive httpx client per worker thread instead of a connection per request.
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

from agent.errors import UpdateError
from fleet_server.errors import ServerUnreachable

USER_AGENT = "edge-fleet-simulator"


class HttpFetcher(FetcherInterface):
    """ngclient's network seam, and artifact downloads, over httpx (thread-safe)."""

    def __init__(self, *, timeout_s: float = 30.0, ca_file: Path | None = None) -> None:
        self._timeout = timeout_s
        self._verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(ca_file)) if ca_file else True
        )
        self._local = threading.local()
        self._lock = threading.Lock()
        self._clients: list[httpx.Client] = []
        self.requests = 0
        self.errors = 0

    def _client(self) -> httpx.Client:
        client: httpx.Client | None = getattr(self._local, "client", None)
        if client is None:
            client = httpx.Client(
                timeout=self._timeout,
                verify=self._verify,
                headers={"User-Agent": USER_AGENT},
                limits=httpx.Limits(max_connections=1, max_keepalive_connections=1),
                trust_env=False,
            )
            self._local.client = client
            with self._lock:
                self._clients.append(client)
        return client

    def _count(self, ok: bool) -> None:
        with self._lock:
            self.requests += 1
            self.errors += 0 if ok else 1

    def get(self, url: str) -> httpx.Response:
        """One GET, counted.

        Raises:
            httpx.HTTPError: the connection failed or timed out.
        """
        try:
            response = self._client().get(url)
        except httpx.HTTPError:
            self._count(False)
            raise
        self._count(response.status_code < 400 or response.status_code == 404)
        return response

    def _fetch(self, url: str) -> Iterator[bytes]:
        response = self.get(url)
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
        except httpx.HTTPError as exc:
            raise UpdateError(f"{url}: {exc}", code="download_failed") from None
        if response.status_code != 200:
            raise UpdateError(f"{url}: HTTP {response.status_code}", code="download_failed")
        return response.content

    def close(self) -> None:
        """Close every thread's client."""
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            client.close()


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
            except httpx.HTTPError as exc:
                raise ServerUnreachable(f"{url}: {exc}") from None
            if response.status_code != 200:
                raise ServerUnreachable(
                    f"{url}: HTTP {response.status_code}: the server has no update "
                    "repositories (edge-fleet keys init), or does not know the device yet"
                )
            found.append(response.content)
        return cls(found[0], found[1])
