"""The CLI's HTTP client: the server URL and token, error bodies turned into FleetErrors,
and a streaming multipart upload with a progress callback."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

from fleet_server.config import ClientSettings
from fleet_server.errors import (
    AuthError,
    Conflict,
    FleetError,
    Forbidden,
    NotFound,
    PayloadTooLarge,
    ServerUnreachable,
    StoreUnavailable,
    ValidationError,
)

_BY_STATUS: dict[int, type[FleetError]] = {
    401: AuthError,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: PayloadTooLarge,
    422: ValidationError,
    503: StoreUnavailable,
}
CHUNK = 256 * 1024


def _error_of(response: httpx.Response) -> FleetError:
    """A FleetError carrying the server's code and message."""
    code, message = "http_error", f"HTTP {response.status_code}"
    try:
        body = response.json()
        err = body.get("error") if isinstance(body, dict) else None
        if isinstance(err, dict):
            code = str(err.get("code", code))
            message = str(err.get("message", message))
        elif isinstance(body, dict) and "detail" in body:
            message = str(body["detail"])
    except ValueError:
        if response.text:
            message = response.text.strip().splitlines()[0][:200]
    cls = _BY_STATUS.get(response.status_code, FleetError)
    return cls(message, code=code)


class ApiClient:
    """Calls the fleet API with the configured token."""

    def __init__(self, settings: ClientSettings, *, timeout: float = 30.0) -> None:
        self.base = settings.url.rstrip("/")
        headers = {"User-Agent": "edge-fleet-cli"}
        if settings.token is not None:
            headers["Authorization"] = f"Bearer {settings.token.get_secret_value()}"
        self._http = httpx.Client(base_url=self.base, headers=headers, timeout=timeout)

    def close(self) -> None:
        self._http.close()

    def request(self, method: str, path: str, **kwargs: Any) -> Any:
        """Send a request and return the JSON body.

        Raises:
            ServerUnreachable: no connection, or a timeout.
            FleetError: the server answered with an error (its code and message).
        """
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServerUnreachable(f"{self.base}: no answer in time ({exc})") from None
        except httpx.TransportError as exc:
            raise ServerUnreachable(f"cannot reach {self.base}: {exc}") from None
        if response.status_code >= 400:
            raise _error_of(response)
        return response.json() if response.content else None

    def get(self, path: str, params: Any = None) -> Any:
        """GET ``path``. Raises like :meth:`request`."""
        return self.request("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        """POST a JSON body. Raises like :meth:`request`."""
        return self.request("POST", path, json=body)

    def patch(self, path: str, body: Any) -> Any:
        """PATCH a JSON body. Raises like :meth:`request`."""
        return self.request("PATCH", path, json=body)

    def get_all(self, path: str, params: dict[str, Any], limit: int | None = None) -> list[Any]:
        """Follow ``next_cursor`` to the end (or ``limit`` items). Raises like :meth:`request`."""
        items: list[Any] = []
        params = dict(params)
        while True:
            page = self.get(path, params)
            items.extend(page["items"])
            if not page.get("next_cursor") or (limit is not None and len(items) >= limit):
                return items[:limit] if limit is not None else items
            params["cursor"] = page["next_cursor"]

    def upload(
        self,
        path: str,
        file: Path,
        fields: dict[str, str],
        progress: Callable[[int], None] | None = None,
        timeout: float = 600.0,
    ) -> Any:
        """POST ``file`` as multipart/form-data, streamed from disk.

        Raises:
            FleetError: the file cannot be read (``file_unreadable``); otherwise like
                :meth:`request`.
        """
        try:
            size = file.stat().st_size
        except OSError as exc:
            raise FleetError(f"{file}: {exc.strerror}", code="file_unreadable") from None
        boundary = uuid.uuid4().hex
        head = b"".join(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        )
        filename = file.name.replace('"', "_")
        head += (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; '
            f'filename="{filename}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        tail = f"\r\n--{boundary}--\r\n".encode()

        def body() -> Iterator[bytes]:
            yield head
            with file.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    if progress is not None:
                        progress(len(chunk))
                    yield chunk
            yield tail

        headers = {
            "Content-Type": f"multipart/form-data; boundary={boundary}",
            "Content-Length": str(len(head) + size + len(tail)),
        }
        return self.request("POST", path, content=body(), headers=headers, timeout=timeout)


def file_size(path: Path) -> int:
    """The size of ``path`` in bytes (0 when it cannot be read; the upload reports it)."""
    try:
        return os.stat(path).st_size
    except OSError:
        return 0
