"""Content-addressed artifact storage behind a small seam.

An artifact (a bundle or a model file) is stored under its sha256 and never changes.
:class:`ArtifactStore` is the seam; :class:`LocalArtifactStore` keeps blobs in a folder
(``ab/cdef...`` fan-out) with atomic writes: a temp file in the same folder, fsync,
``os.replace``, fsync of the folder. Several replicas may share the folder (NFS or a
shared volume): identical content lands on the identical name, so concurrent writers
cannot corrupt each other.

An S3 implementation fits the same protocol: ``put`` streams to a multipart upload while
hashing, then copies to ``sha256/<digest>`` (or uploads to a temp key and renames);
``open_range`` maps to a ranged ``GetObject``; ``exists`` to ``HeadObject``. Nothing
else in the server touches the filesystem for artifacts.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from fleet_server.errors import ArtifactError, NotFound, PayloadTooLarge

CHUNK = 1024 * 1024
_SHA_RE = re.compile(r"^[0-9a-f]{64}$")


class Reader(Protocol):
    """What :meth:`ArtifactStore.open_range` returns: read it, then close it."""

    def read(self, n: int = -1, /) -> bytes: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class StoredArtifact:
    sha256: str
    size: int


class ArtifactStore(Protocol):
    """Where release artifacts live, addressed by their sha256 (lowercase hex)."""

    def put(self, source: BinaryIO, *, max_bytes: int | None = None) -> StoredArtifact:
        """Stream ``source`` into the store, hashing as it goes; returns digest and size.

        Raises:
            PayloadTooLarge: more than ``max_bytes`` were read (nothing is stored).
            ArtifactError: the store could not write.
        """
        ...

    def exists(self, sha256: str) -> bool:
        """True when the artifact is stored."""
        ...

    def size(self, sha256: str) -> int:
        """The artifact's size in bytes.

        Raises:
            NotFound: it is not stored.
        """
        ...

    def open_range(self, sha256: str, start: int = 0, end: int | None = None) -> Reader:
        """A reader of bytes ``[start, end)`` of the artifact (to its end if ``end`` is
        ``None``). The caller closes it.

        Raises:
            NotFound: it is not stored.
        """
        ...

    def delete(self, sha256: str) -> bool:
        """Remove the artifact; ``False`` when it was not there."""
        ...


def check_digest(sha256: str) -> str:
    """``sha256`` if it is 64 lowercase hex digits.

    Raises:
        NotFound: it is not (so no path outside the store can ever be formed from it).
    """
    if not _SHA_RE.match(sha256):
        raise NotFound(f"no artifact {sha256[:80]!r}")
    return sha256


class _RangeReader:
    """A file object that stops at ``end``."""

    def __init__(self, fh: BinaryIO, remaining: int | None) -> None:
        self._fh = fh
        self._remaining = remaining

    def read(self, n: int = -1, /) -> bytes:
        if self._remaining is not None:
            n = self._remaining if n < 0 else min(n, self._remaining)
        data = self._fh.read(n)
        if self._remaining is not None:
            self._remaining -= len(data)
        return data

    def close(self) -> None:
        self._fh.close()


class LocalArtifactStore:
    """An :class:`ArtifactStore` in a local (or shared) folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        try:
            self._tmp.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ArtifactError(f"cannot create artifact folder {root}: {exc.strerror}") from exc

    def path(self, sha256: str) -> Path:
        """Where the artifact lives (whether or not it exists).

        Raises:
            NotFound: ``sha256`` is not a digest.
        """
        check_digest(sha256)
        return self.root / sha256[:2] / sha256[2:]

    def put(self, source: BinaryIO, *, max_bytes: int | None = None) -> StoredArtifact:
        """See :meth:`ArtifactStore.put`."""
        digest = hashlib.sha256()
        size = 0
        fd, tmp_name = tempfile.mkstemp(dir=self._tmp, prefix="put-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := source.read(CHUNK):
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise PayloadTooLarge(f"artifact is larger than {max_bytes} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            final = self.path(sha)
            final.parent.mkdir(exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
        except OSError as exc:
            raise ArtifactError(f"cannot store artifact: {exc.strerror or exc}") from exc
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        return StoredArtifact(sha, size)

    def put_file(self, path: Path) -> StoredArtifact:
        """Store a local file (streamed). See :meth:`put`.

        Raises:
            ArtifactError: the file cannot be read or stored.
        """
        try:
            with path.open("rb") as fh:
                return self.put(fh)
        except OSError as exc:
            raise ArtifactError(f"cannot read {path}: {exc.strerror}") from exc

    def exists(self, sha256: str) -> bool:
        """See :meth:`ArtifactStore.exists`."""
        return _SHA_RE.match(sha256) is not None and self.path(sha256).is_file()

    def size(self, sha256: str) -> int:
        """See :meth:`ArtifactStore.size`."""
        try:
            return self.path(sha256).stat().st_size
        except FileNotFoundError as exc:
            raise NotFound(f"no artifact {sha256}") from exc

    def open_range(self, sha256: str, start: int = 0, end: int | None = None) -> Reader:
        """See :meth:`ArtifactStore.open_range`."""
        try:
            fh = self.path(sha256).open("rb")
        except FileNotFoundError as exc:
            raise NotFound(f"no artifact {sha256}") from exc
        if start:
            fh.seek(start)
        if end is None:
            return fh
        return _RangeReader(fh, max(0, end - start))

    def delete(self, sha256: str) -> bool:
        """See :meth:`ArtifactStore.delete`."""
        try:
            self.path(sha256).unlink()
        except FileNotFoundError:
            return False
        return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
