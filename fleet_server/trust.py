"""The running server's signing side: the TUF repositories and the device CA's CRL.

:class:`Repositories` holds the image repository and the director of
``{tuf_dir}/image``, ``{tuf_dir}/director`` with the online keys of ``{tuf_dir}/keys``.
``edge-fleet keys rotate`` changes those files under a running server; the repositories
are rebuilt from disk when a key file or a ``root.json`` changed (a ``stat`` of each known
file on every use; the key folder is listed again at most every ``glob_interval_s``), so
the server never signs with a key the newest root no longer trusts.

:class:`Revocations` re-signs the CA's CRL and copies it where the broker reads it
(``ca.crl_file``), on every revocation and periodically.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

from fleet_server.ca import CertificateAuthority
from fleet_server.errors import ConfigError, ValidationError
from fleet_server.keys import load_online_signers
from fleet_server.tuf import Director, ImageRepository, LocalFolderStore, RefreshResult

log = logging.getLogger("fleet_server.trust")

_Stamp = tuple[tuple[str, int, int, int], ...]


class Repositories:
    """The image repository and the director, reloaded when their keys or roots change."""

    def __init__(
        self, tuf_dir: Path, *, check_interval_s: float = 0.0, glob_interval_s: float = 1.0
    ) -> None:
        """Load both repositories from ``tuf_dir``.

        Raises:
            KeysError: an online key is missing, unreadable or readable by others.
        """
        self.tuf_dir = tuf_dir
        self._interval = check_interval_s
        self._glob_interval = glob_interval_s
        self._lock = threading.Lock()
        self._checked = 0.0
        self._globbed = -float("inf")
        self._known: list[Path] = []
        self._stamp: _Stamp = ()
        self._image: ImageRepository | None = None
        self._director: Director | None = None
        self._reload_if_changed(force=True)

    @staticmethod
    def present(tuf_dir: Path) -> bool:
        """True when ``keys init`` created the image repository in ``tuf_dir``."""
        return (tuf_dir / "image" / "root.json").exists()

    def _files(self) -> list[Path]:
        now = time.monotonic()
        if now - self._globbed >= self._glob_interval:  # a new key file: seen within 1 s
            self._globbed = now
            self._known = [
                *sorted((self.tuf_dir / "keys").glob("*.pem")),
                self.tuf_dir / "image" / "root.json",
                self.tuf_dir / "director" / "root.json",
            ]
        return self._known

    def _current_stamp(self) -> _Stamp:
        stamp = []
        for path in self._files():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            stamp.append((path.name, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamp)

    def _reload_if_changed(self, *, force: bool = False) -> None:
        now = time.monotonic()
        with self._lock:
            if not force and now - self._checked < self._interval:
                return
            self._checked = now
            stamp = self._current_stamp()
            if stamp == self._stamp and not force:
                return
            if not force:  # something changed: list the key folder again before loading
                self._globbed = -float("inf")
                stamp = self._current_stamp()
            keys = self.tuf_dir / "keys"
            image = ImageRepository(
                LocalFolderStore(self.tuf_dir / "image"), load_online_signers(keys, "image")
            )
            director = None
            if (self.tuf_dir / "director" / "root.json").exists():
                director = Director(
                    LocalFolderStore(self.tuf_dir / "director"),
                    load_online_signers(keys, "director"),
                )
            if self._stamp:
                log.info("signing keys or roots changed on disk: repositories reloaded")
            self._image, self._director, self._stamp = image, director, stamp

    @property
    def image(self) -> ImageRepository:
        """The image repository (reloaded first if its keys changed).

        Raises:
            KeysError: a rotated key cannot be loaded.
        """
        self._reload_if_changed()
        assert self._image is not None
        return self._image

    @property
    def director(self) -> Director | None:
        """The director, or None when it was not created.

        Raises:
            KeysError: a rotated key cannot be loaded.
        """
        self._reload_if_changed()
        return self._director

    def image_root(self) -> dict[str, Any]:
        """The newest image root (a device's first trust anchor), parsed.

        Raises:
            MetadataNotFound: the repository has no root.
        """
        root: dict[str, Any] = json.loads(self.image.root_bytes())
        return root

    def director_root(self) -> dict[str, Any] | None:
        """The newest director root, parsed, or None without a director.

        Raises:
            MetadataNotFound: the director has no root.
        """
        director = self.director
        if director is None:
            return None
        root: dict[str, Any] = json.loads(director.root_bytes())
        return root

    def refresh(self) -> RefreshResult:
        """Re-sign the image repository's online roles past half their lifetime.

        Raises:
            MetadataNotFound: the repository is gone.
        """
        return self.image.refresh()


def write_public(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically with mode 0644 (for another daemon to read).

    Raises:
        OSError: the folder is not writable.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.fchmod(fd, 0o644)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


class Revocations:
    """Revokes device certificates and keeps the broker's copy of the CRL fresh."""

    def __init__(
        self, ca: CertificateAuthority, *, crl_file: Path | None, validity_days: int = 7
    ) -> None:
        self.ca = ca
        self.crl_file = crl_file
        self.validity_days = validity_days
        self._lock = threading.Lock()

    def publish(self) -> bytes:
        """Re-sign the CRL, write ``crl.pem`` in the CA folder and the broker's copy.

        Raises:
            ConfigError: the CA's revocation list or the broker's copy cannot be written.
        """
        with self._lock:
            try:
                pem = self.ca.crl_pem(self.validity_days)
                if self.crl_file is not None:
                    write_public(self.crl_file, pem)
            except OSError as exc:
                where = f" to {exc.filename}" if exc.filename else ""
                raise ConfigError(
                    f"cannot write the CRL{where}: {exc.strerror or exc}", code="crl_unwritable"
                ) from None
        return pem

    def revoke(self, serial_hex: str) -> bytes:
        """Revoke the certificate with serial ``serial_hex`` and publish the CRL.

        Raises:
            ValidationError: the serial is not a positive hex number.
            ConfigError: the CRL cannot be written.
        """
        try:
            serial = int(serial_hex, 16)
        except ValueError:
            raise ValidationError(f"certificate serial {serial_hex!r} is not hex") from None
        with self._lock:
            try:
                self.ca.revoke(serial)
            except OSError as exc:
                raise ConfigError(
                    f"cannot record the revocation: {exc.strerror or exc}", code="crl_unwritable"
                ) from None
        return self.publish()
