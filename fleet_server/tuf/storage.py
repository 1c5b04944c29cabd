"""The storage seam of the TUF repositories: named byte blobs, written atomically.

A repository keeps every metadata file as a blob named like the URL it is served at
(``timestamp.json``, ``3.snapshot.json``, ``1.root.json``) plus a little bookkeeping
(``devices/{id}/revision.json``). :class:`MetadataStore` is all a repository needs; the
local folder below is the default, a database- or S3-backed store can replace it.
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Protocol

from fleet_server.tuf.errors import MetadataNotFound

#: Store names: relative, ``/``-separated segments of a safe alphabet, no ``.``/``..``.
_SEGMENT_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")
_MAX_DEPTH = 4


def check_store_name(name: str) -> str:
    """Return ``name`` when it is a safe store name.

    Raises:
        ValueError: ``name`` is empty, absolute, too deep, or has a segment outside
            ``[A-Za-z0-9_.-]`` or equal to ``.``/``..``.
    """
    segments = name.split("/")
    if len(segments) > _MAX_DEPTH or not all(_SEGMENT_RE.fullmatch(s) for s in segments):
        raise ValueError(f"unsafe store name {name!r}")
    return name


class MetadataStore(Protocol):
    """Named blobs. Writes must be atomic: a reader sees the old or the new bytes."""

    def read(self, name: str) -> bytes:
        """The bytes stored under ``name``.

        Raises:
            MetadataNotFound: nothing is stored under ``name``.
        """
        ...

    def write(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``, replacing what was there, atomically."""
        ...

    def delete(self, name: str) -> None:
        """Remove ``name``; removing a missing name is not an error."""
        ...


_Stat = tuple[int, int, int, int]  # inode, mtime and ctime (ns), size


class LocalFolderStore:
    """A :class:`MetadataStore` in a local folder: tempfile + fsync + ``os.replace``.

    Reads are served from memory while the file's inode, times and size are unchanged
    (one ``stat`` per read), so a file another process replaces (a replica, the CLI) is
    seen at once. The cache holds at most ``cache_entries`` files of at most
    ``cache_max_bytes`` each.
    """

    def __init__(
        self, root: Path, *, cache_entries: int = 256, cache_max_bytes: int = 4 * 2**20
    ) -> None:
        self.root = root
        self._cache: OrderedDict[str, tuple[_Stat, bytes]] = OrderedDict()
        self._cache_entries = cache_entries
        self._cache_max_bytes = cache_max_bytes
        self._lock = threading.Lock()

    def _path(self, name: str) -> Path:
        return self.root / check_store_name(name)

    def read(self, name: str) -> bytes:
        """The bytes stored under ``name``.

        Raises:
            MetadataNotFound: no file ``name``.
            ValueError: ``name`` is not a safe store name.
        """
        path = self._path(name)
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise MetadataNotFound(f"no metadata named {name}") from None
        stamp = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        with self._lock:
            hit = self._cache.get(name)
            if hit is not None and hit[0] == stamp:
                self._cache.move_to_end(name)
                return hit[1]
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            raise MetadataNotFound(f"no metadata named {name}") from None
        if len(data) == st.st_size and len(data) <= self._cache_max_bytes:
            with self._lock:
                self._cache[name] = (stamp, data)
                self._cache.move_to_end(name)
                while len(self._cache) > self._cache_entries:
                    self._cache.popitem(last=False)
        return data

    def write(self, name: str, data: bytes) -> None:
        """Write ``data`` to ``name`` atomically (durable once this returns).

        Raises:
            OSError: the folder is not writable.
            ValueError: ``name`` is not a safe store name.
        """
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            os.fchmod(fd, 0o644)  # metadata is public; mkstemp's 0600 would hide it from a proxy
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def delete(self, name: str) -> None:
        """Remove ``name`` if it exists.

        Raises:
            ValueError: ``name`` is not a safe store name.
        """
        with contextlib.suppress(FileNotFoundError):
            self._path(name).unlink()


class MemoryStore:
    """A :class:`MetadataStore` in a dict, for tests and throw-away repositories."""

    def __init__(self) -> None:
        self.blobs: dict[str, bytes] = {}

    def read(self, name: str) -> bytes:
        """The bytes stored under ``name``.

        Raises:
            MetadataNotFound: nothing is stored under ``name``.
        """
        try:
            return self.blobs[check_store_name(name)]
        except KeyError:
            raise MetadataNotFound(f"no metadata named {name}") from None

    def write(self, name: str, data: bytes) -> None:
        """Store ``data`` under ``name``."""
        self.blobs[check_store_name(name)] = bytes(data)

    def delete(self, name: str) -> None:
        """Remove ``name`` if it exists."""
        self.blobs.pop(check_store_name(name), None)
