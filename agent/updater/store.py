"""The content-addressed artifact store in the agent's state dir.

Layout (all under ``{state_dir}/updates/``, folders 0700)::

    incoming/{sha256}.part      a download in progress (kept across restarts: resumed)
    store/{sha256}/{file}       a complete artifact: the file 0444, its folder 0500

An artifact keeps the file name of its target (``model.onnx``, ``face.tar.gz``): the loader
tells formats by suffix. Once complete, a file is never written again; it is verified
against the signed length and hashes on that read-only path, and loaded from the same
path. The serving version, the one being installed and ``keep_versions`` older ones are
kept; :meth:`ArtifactStore.prune` removes the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
from pathlib import Path

from tuf.api._payload import TargetFile
from tuf.api.exceptions import LengthOrHashMismatchError

from agent.errors import TargetMismatch, UpdateError

log = logging.getLogger("agent.updater.store")

_SHA256_RE = re.compile(r"[0-9a-f]{64}")
_FILE_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9_.-]{0,127}")


class InsufficientDisk(UpdateError):
    """The artifact would not fit on the disk with the configured margin left free."""

    code = "insufficient_disk"


def check_sha256(sha256: str) -> str:
    """``sha256`` when it is 64 lowercase hex digits.

    Raises:
        UpdateError: anything else (it would be used as a folder name).
    """
    if not _SHA256_RE.fullmatch(sha256):
        raise UpdateError(f"bad sha256 {sha256!r}", code="metadata_invalid")
    return sha256


def verify_artifact(path: Path, target_path: str, length: int, hashes: dict[str, str]) -> None:
    """Check the file at ``path`` against the signed ``length`` and ``hashes``.

    Raises:
        TargetMismatch: the length or a hash differs, or the file cannot be read.
    """
    target = TargetFile(length, hashes, target_path)
    try:
        with path.open("rb") as f:
            target.verify_length_and_hashes(f)
    except LengthOrHashMismatchError as exc:
        raise TargetMismatch(f"{target_path}: {exc}") from None
    except OSError as exc:
        raise TargetMismatch(f"{target_path}: cannot read {path.name}: {exc.strerror}") from None


class ArtifactStore:
    """Complete artifacts by sha256, and partial downloads."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.store = root / "store"
        for folder in (root, self.incoming, self.store):
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)

    # --- paths ---------------------------------------------------------------------------

    def path(self, sha256: str, file: str) -> Path:
        """Where the complete artifact ``sha256`` named ``file`` lives.

        Raises:
            UpdateError: a bad sha256 or file name.
        """
        if not _FILE_RE.fullmatch(file):
            raise UpdateError(f"bad artifact file name {file!r}", code="target_path_invalid")
        return self.store / check_sha256(sha256) / file

    def partial(self, sha256: str) -> Path:
        """The partial download of ``sha256``."""
        return self.incoming / f"{check_sha256(sha256)}.part"

    def has(self, sha256: str, file: str) -> bool:
        """True when the complete artifact is in the store."""
        return self.path(sha256, file).is_file()

    def artifacts(self) -> list[str]:
        """The sha256 of every complete artifact."""
        return sorted(p.name for p in self.store.iterdir() if _SHA256_RE.fullmatch(p.name))

    # --- space ---------------------------------------------------------------------------

    def free_bytes(self) -> int:
        """Free bytes on the store's file system (for this user)."""
        return shutil.disk_usage(self.root).free

    def check_space(self, sha256: str, length: int, margin: int) -> None:
        """Refuse a download that would leave less than ``margin`` bytes free.

        Raises:
            InsufficientDisk: with the numbers.
        """
        needed = max(0, length - _size(self.partial(sha256)))
        free = self.free_bytes()
        if free - needed < margin:
            raise InsufficientDisk(
                f"the artifact needs {needed} more bytes and {margin} must stay free, "
                f"but only {free} are free"
            )

    # --- changes -------------------------------------------------------------------------

    def commit(self, sha256: str, file: str) -> Path:
        """Move the complete partial download into the store, read-only; its final path.

        Raises:
            UpdateError: the partial file is missing, or the store cannot be written.
        """
        final = self.path(sha256, file)
        partial = self.partial(sha256)
        folder = final.parent
        try:
            if folder.exists():
                _make_writable(folder)
            folder.mkdir(mode=0o700, exist_ok=True)
            os.chmod(partial, 0o444)
            os.replace(partial, final)
            _fsync_dir(folder)
            _fsync_dir(self.incoming)
            os.chmod(folder, 0o500)
        except OSError as exc:
            raise UpdateError(
                f"cannot store artifact {sha256[:12]}: {exc.strerror or exc}", code="store_failed"
            ) from None
        return final

    def remove(self, sha256: str) -> None:
        """Delete the artifact ``sha256`` and its partial download (missing is fine)."""
        folder = self.store / check_sha256(sha256)
        if folder.exists():
            _make_writable(folder)
            shutil.rmtree(folder, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            self.partial(sha256).unlink()

    def prune(self, keep: set[str]) -> list[str]:
        """Delete every complete artifact and partial download not in ``keep``; the deleted."""
        removed = []
        for sha256 in self.artifacts():
            if sha256 not in keep:
                self.remove(sha256)
                removed.append(sha256)
        for part in self.incoming.glob("*.part"):
            if part.stem not in keep:
                with contextlib.suppress(OSError):
                    part.unlink()
        if removed:
            log.info("store: removed %d old artifact(s)", len(removed))
        return removed


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _make_writable(folder: Path) -> None:
    os.chmod(folder, stat.S_IRWXU)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
