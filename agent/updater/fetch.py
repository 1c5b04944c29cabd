"""The agent's own HTTP client: TUF metadata, and resumable, rate-capped artifact downloads.

python-tuf's ngclient downloads a target in one go; a device on a poor link needs more:

* **Resume.** Bytes go to a partial file. After a cut, the next attempt asks for
  ``Range: bytes={have}-`` and appends; a server that ignores Range (200) restarts it.
* **Signed length first.** The server's ``Content-Length`` / ``Content-Range`` must
  agree with the signed length, and never is a byte beyond it written: a truncated or
  oversized artifact is refused (``target_mismatch``) without filling the disk.
* **A bandwidth cap** (bytes per second, a token bucket over the whole download).
* **TLS** with the fleet's CA and, when configured, the device's client certificate.

:class:`TufFetcher` lends the same client to ngclient (``UpdateVerifier(fetcher=...)``).
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import logging
import os
import re
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tuf.api.exceptions import DownloadHTTPError
from tuf.ngclient.fetcher import FetcherInterface

import agent
from agent.errors import TargetMismatch, UpdateError
from agent.updater.config import UpdateConfig

log = logging.getLogger("agent.updater.fetch")

CHUNK = 64 * 1024
_CONTENT_RANGE_RE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
#: errno values that mean the disk is full (EFBIG: a file size limit).
_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class DownloadStopped(Exception):
    """The updater is stopping; the partial file is kept for the next start."""


class DiskFull(UpdateError):
    code = "disk_full"


@dataclass
class DownloadResult:
    """How a download went: bytes written by this call, attempts, whether it resumed."""

    bytes_written: int
    attempts: int
    resumed_from: int


class HttpClient:
    """GET over HTTP(S) with the fleet's CA, an optional client certificate and a timeout."""

    def __init__(
        self,
        *,
        timeout_s: float = 30.0,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
    ) -> None:
        """Raises UpdateError (``tls_config_invalid``): the CA or certificate files are unusable."""
        self.timeout_s = timeout_s
        try:
            context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
            if cert_file is not None:
                context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise UpdateError(f"TLS files: {exc}", code="tls_config_invalid") from None
        self._opener = urllib.request.build_opener(
            urllib.request.HTTPSHandler(context=context),
            urllib.request.ProxyHandler({}),  # the fleet server is reached directly
        )
        self.user_agent = f"edge-agent/{agent.__version__}"

    @classmethod
    def from_config(cls, config: UpdateConfig) -> HttpClient:
        """The client ``config`` describes (Raises UpdateError: unusable TLS files)."""
        return cls(
            timeout_s=config.http_timeout_s,
            ca_file=config.ca_file,
            cert_file=config.cert_file,
            key_file=config.key_file,
        )

    def get(self, url: str, headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        """Send a GET; the open response (the caller closes it).

        Raises:
            urllib.error.HTTPError: the server answered 4xx or 5xx.
            OSError: the connection failed (``urllib.error.URLError`` included).
        """
        request = urllib.request.Request(
            url, headers={"User-Agent": self.user_agent, **(headers or {})}
        )
        response = self._opener.open(request, timeout=self.timeout_s)
        assert isinstance(response, http.client.HTTPResponse)
        return response


class TufFetcher(FetcherInterface):
    """ngclient's network seam, over :class:`HttpClient` (same TLS settings)."""

    def __init__(self, client: HttpClient) -> None:
        self._client = client

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._client.get(url)
        except urllib.error.HTTPError as exc:
            exc.close()
            raise DownloadHTTPError(f"{url}: HTTP {exc.code}", exc.code) from None
        return self._chunks(response)

    @staticmethod
    def _chunks(response: http.client.HTTPResponse) -> Iterator[bytes]:
        with response:
            while chunk := response.read(CHUNK):
                yield chunk


class RateLimiter:
    """A token bucket: :meth:`take` sleeps so the average rate stays under ``rate``."""

    def __init__(self, rate: int | None, burst_s: float = 0.25) -> None:
        self.rate = rate
        self._burst = (rate or 0) * burst_s
        self._tokens = self._burst
        self._last = time.monotonic()

    def take(self, n: int, stop: threading.Event | None = None) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self.rate)
        self._last = now
        self._tokens -= n
        if self._tokens < 0:
            wait = -self._tokens / self.rate
            if stop is not None:
                stop.wait(wait)
            else:
                time.sleep(wait)


class Downloader:
    """Resumable downloads into a partial file, within the signed length."""

    def __init__(
        self,
        client: HttpClient,
        *,
        rate_limit: int | None = None,
        max_attempts: int = 5,
        backoff_s: float = 1.0,
        stop: threading.Event | None = None,
    ) -> None:
        self.client = client
        self.rate_limit = rate_limit
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.stop = stop or threading.Event()

    def download(self, url: str, partial: Path, length: int) -> DownloadResult:
        """Fetch ``url`` into ``partial`` until it holds exactly ``length`` bytes (fsynced).

        Bytes already in ``partial`` are kept and the rest asked for with Range.

        Raises:
            TargetMismatch: the server offers more or fewer bytes than the signed length.
            DiskFull: the disk filled up (the partial file is deleted to free it).
            UpdateError: ``download_failed`` after ``max_attempts`` failed attempts.
            DownloadStopped: :attr:`stop` was set (the partial file is kept).
        """
        limiter = RateLimiter(self.rate_limit)
        resumed_from = _size(partial)
        written = 0
        last_error = "no attempt"
        for attempt in range(1, self.max_attempts + 1):
            if self.stop.is_set():
                raise DownloadStopped
            try:
                written += self._attempt(url, partial, length, limiter)
                if _size(partial) == length:
                    _fsync(partial)
                    return DownloadResult(written, attempt, resumed_from)
                last_error = f"the connection closed at byte {_size(partial)} of {length}"
            except urllib.error.HTTPError as exc:
                exc.close()
                last_error = f"HTTP {exc.code} {exc.reason}"
                if exc.code == 416:  # our Range starts at or past the server's end
                    _check_unsatisfiable(exc.headers.get("Content-Range", ""), length)
                    _truncate(partial)
            except OSError as exc:
                if exc.errno in _DISK_FULL:
                    _remove(partial)
                    raise DiskFull(f"the disk filled up while downloading: {exc}") from None
                last_error = _describe(exc)
            except http.client.HTTPException as exc:
                last_error = f"{type(exc).__name__}: {exc}"
            log.warning("download %s, attempt %d: %s", url, attempt, last_error)
            if attempt < self.max_attempts:
                self.stop.wait(min(60.0, self.backoff_s * 2 ** (attempt - 1)))
        raise UpdateError(
            f"{self.max_attempts} attempts failed; last: {last_error}", code="download_failed"
        )

    def _attempt(self, url: str, partial: Path, length: int, limiter: RateLimiter) -> int:
        have = _size(partial)
        if have > length:
            _truncate(partial)
            have = 0
        if have == length:
            return 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        written = 0
        with self.client.get(url, headers) as response:
            start = self._start_offset(response, have, length)
            with partial.open("r+b" if partial.exists() else "wb") as out:
                out.seek(start)
                out.truncate()
                position = start
                while chunk := response.read(CHUNK):
                    if self.stop.is_set():
                        raise DownloadStopped
                    if position + len(chunk) > length:
                        _remove(partial)
                        raise TargetMismatch(f"the server sent more than the signed {length} bytes")
                    out.write(chunk)
                    position += len(chunk)
                    written += len(chunk)
                    limiter.take(len(chunk), self.stop)
                out.flush()
        return written

    @staticmethod
    def _start_offset(response: http.client.HTTPResponse, have: int, length: int) -> int:
        """Where the response's bytes go in the file; checks the lengths the server states."""
        if response.status == 206:
            match = _CONTENT_RANGE_RE.fullmatch(response.headers.get("Content-Range", ""))
            if match is None or int(match[1]) != have:
                got = response.headers.get("Content-Range")
                raise UpdateError(
                    f"bad Content-Range {got!r} for bytes {have}-", code="download_failed"
                )
            total = match[3]
            if total != "*" and int(total) != length:
                raise TargetMismatch(f"the server has {total} bytes, the signed length is {length}")
            return have
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) != length:
            raise TargetMismatch(f"the server has {declared} bytes, the signed length is {length}")
        return 0  # a full answer (the server ignored Range): start again


def _check_unsatisfiable(content_range: str, length: int) -> None:
    """A 416 states the server's size (``bytes */N``): refuse one that is not the signed one."""
    match = re.fullmatch(r"bytes \*/(\d+)", content_range)
    if match is not None and int(match[1]) != length:
        raise TargetMismatch(f"the server has {match[1]} bytes, the signed length is {length}")


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _truncate(path: Path) -> None:
    if path.exists():
        with path.open("r+b") as f:
            f.truncate(0)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _describe(exc: OSError) -> str:
    if isinstance(exc, urllib.error.URLError) and not isinstance(exc.reason, str):
        return f"cannot connect: {exc.reason}"
    return f"{type(exc).__name__}: {exc}"
