"""Streaming multipart uploads with a size cap.

The request body is parsed as it arrives (``python_multipart``): the ``file`` part goes
straight into a file of its own temp folder (under the uploader's file name, made safe),
small text fields are kept in memory. Going over ``max_bytes`` aborts at once with 413,
so an oversized upload never fills the disk. Blocking writes run in a worker thread, off
the event loop.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import anyio.to_thread
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from fleet_server.errors import PayloadTooLarge, ValidationError
from fleet_server.releases import upload_suffix

MAX_FIELD_BYTES = 1024
_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]")
MAX_FIELDS = 8


@dataclass
class ReceivedUpload:
    """A finished upload: the file on disk (remove it with :meth:`cleanup`) and the fields."""

    path: Path
    filename: str
    size: int
    fields: dict[str, str] = field(default_factory=dict)

    def cleanup(self) -> None:
        """Remove the file and its private folder."""
        shutil.rmtree(self.path.parent, ignore_errors=True)


class _Collector:
    """python_multipart callbacks that write the file part and collect the fields."""

    def __init__(self, tmp_dir: Path, file_field: str) -> None:
        self.tmp_dir, self.file_field = tmp_dir, file_field
        self.fields: dict[str, str] = {}
        self.path: Path | None = None
        self.filename = ""
        self.size = 0
        self._out: IO[bytes] | None = None
        self._name = ""
        self._headers: dict[bytes, bytes] = {}
        self._hfield = b""
        self._hvalue = b""
        self._buf = bytearray()

    def callbacks(self) -> dict[str, object]:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._headers, self._buf, self._name = {}, bytearray(), ""

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._hfield += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._hvalue += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._hfield.lower()] = self._hvalue
        self._hfield, self._hvalue = b"", b""

    def _headers_finished(self) -> None:
        _, params = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = params.get(b"name", b"").decode("utf-8", "replace")
        filename = params.get(b"filename")
        if self._name == self.file_field and filename is not None:
            if self._out is not None:
                raise ValidationError(f"{self.file_field}: only one file per upload")
            self.filename = Path(filename.decode("utf-8", "replace")).name
            upload_suffix(self.filename)  # refuse an unknown file type before reading it
            # Keep the uploader's file name (made safe): a bare model's name comes from it.
            folder = Path(tempfile.mkdtemp(dir=self.tmp_dir, prefix="upload-"))
            self.path = folder / (_UNSAFE.sub("_", self.filename).lstrip(".") or "upload")
            self._out = self.path.open("xb")
        elif len(self.fields) >= MAX_FIELDS:
            raise ValidationError("too many form fields")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self._out is not None and self._name == self.file_field:
            self._out.write(data[start:end])
            self.size += end - start
            return
        self._buf += data[start:end]
        if len(self._buf) > MAX_FIELD_BYTES:
            raise ValidationError(f"{self._name}: form field longer than {MAX_FIELD_BYTES} bytes")

    def _part_end(self) -> None:
        if self._name == self.file_field and self._out is not None:
            self._out.flush()
            os.fsync(self._out.fileno())
            self._out.close()
        elif self._name:
            self.fields[self._name] = self._buf.decode("utf-8", "replace")

    def abort(self) -> None:
        if self._out is not None and not self._out.closed:
            self._out.close()
        if self.path is not None:
            shutil.rmtree(self.path.parent, ignore_errors=True)


async def _capped(stream: AsyncIterator[bytes], max_bytes: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > max_bytes:
            raise PayloadTooLarge(f"upload is larger than {max_bytes} bytes")
        yield chunk


async def receive_upload(
    request: Request, *, tmp_dir: Path, max_bytes: int, file_field: str = "file"
) -> ReceivedUpload:
    """Stream a ``multipart/form-data`` body to disk.

    Raises:
        PayloadTooLarge: the body (by Content-Length or as counted) exceeds ``max_bytes``.
        ValidationError: not multipart, no ``file`` part, an unsupported file type, or
            oversized/too many text fields.
    """
    ctype, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise ValidationError("body: expected multipart/form-data with a file part")
    length = request.headers.get("content-length")
    if length and length.isdigit() and int(length) > max_bytes + 64 * 1024:
        raise PayloadTooLarge(f"upload is larger than {max_bytes} bytes")
    tmp_dir.mkdir(parents=True, exist_ok=True)
    collector = _Collector(tmp_dir, file_field)
    parser = MultipartParser(boundary, collector.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in _capped(request.stream(), max_bytes + 64 * 1024):
            await anyio.to_thread.run_sync(parser.write, chunk)
        parser.finalize()
    except BaseException:
        collector.abort()
        raise
    if collector.path is None:
        raise ValidationError(f"{file_field}: the upload has no file part")
    if collector.size > max_bytes:
        collector.abort()
        raise PayloadTooLarge(f"upload is larger than {max_bytes} bytes")
    return ReceivedUpload(collector.path, collector.filename, collector.size, collector.fields)
