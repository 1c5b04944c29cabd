"""The TUF image repository: every model artifact the fleet may run, signed once.

Layout in the store (consistent snapshots, names as served under ``/tuf/image/``)::

    {N}.root.json  root.json  {V}.targets.json  {V}.snapshot.json  timestamp.json

A change writes targets, then snapshot, then ``timestamp.json`` last, so a reader always
sees a complete repository state. The previous ``keep_versions`` snapshot and targets
files stay servable for clients that read the old timestamp a moment before the change.
The targets, snapshot and timestamp keys are online; the root keys are offline and only
needed to create the repository, rotate keys or renew the root.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

# The defining modules: tuf.api.metadata and securesystemslib.signer re-export these names
# only implicitly, which mypy --strict refuses.
from securesystemslib.signer._signer import Signer
from tuf.api._payload import MetaFile, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.metadata import Metadata

from agent.updater.targets import ImageTargetCustom, parse_model_target
from fleet_server.errors import Conflict
from fleet_server.tuf.errors import MetadataNotFound, TargetInvalid, TargetNameInvalid
from fleet_server.tuf.signing import (
    Clock,
    RoleSigners,
    RootChain,
    set_issued,
    sign,
    to_bytes,
    utc_now,
)
from fleet_server.tuf.storage import MetadataStore

#: The names a client may fetch.
SERVED_NAME_RE = re.compile(r"(?:[1-9][0-9]{0,15}\.(?:root|snapshot|targets)|root|timestamp)\.json")
_HASH_ALGOS = {"sha256": 64, "sha512": 128}


class ImageRepoConfig(BaseModel):
    """Lifetimes of the image repository's metadata; each is re-signed at half its life."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root_expiry: timedelta = timedelta(days=365)
    targets_expiry: timedelta = timedelta(days=90)
    snapshot_expiry: timedelta = timedelta(days=7)
    timestamp_expiry: timedelta = timedelta(days=1)
    keep_versions: int = Field(default=3, ge=1, le=100)


@dataclass(frozen=True)
class RefreshResult:
    """What :meth:`ImageRepository.refresh` re-signed, and when the root expires."""

    resigned: tuple[str, ...]
    root_expires: datetime


def check_hashes(hashes: Mapping[str, str]) -> dict[str, str]:
    """``hashes`` as a dict when it holds a lowercase-hex sha256 (and optionally sha512).

    Raises:
        TargetInvalid: sha256 is missing, or an algorithm or digest is malformed.
    """
    if "sha256" not in hashes:
        raise TargetInvalid("a target needs a sha256 hash")
    for algo, digest in hashes.items():
        size = _HASH_ALGOS.get(algo)
        if size is None or not re.fullmatch(rf"[0-9a-f]{{{size}}}", digest):
            raise TargetInvalid(f"bad {algo} hash {digest!r}")
    return dict(hashes)


class ImageRepository:
    """Signs and serves the image repository's metadata."""

    def __init__(
        self,
        store: MetadataStore,
        signers: RoleSigners,
        config: ImageRepoConfig | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._store = store
        self._signers = signers
        self._config = config or ImageRepoConfig()
        self._clock = clock
        self._lock = threading.RLock()
        self.roots = RootChain(store, self._config.root_expiry, clock)
        #: (timestamp.json bytes, the targets they lead to): read-only, for lookups.
        self._lookup: tuple[bytes, dict[str, TargetFile]] | None = None

    @classmethod
    def create(
        cls,
        store: MetadataStore,
        root_signers: Sequence[Signer],
        root_threshold: int,
        signers: RoleSigners,
        *,
        config: ImageRepoConfig | None = None,
        clock: Clock = utc_now,
    ) -> ImageRepository:
        """Create an empty repository: root v1, empty targets, snapshot and timestamp.

        Raises:
            Conflict: the store already holds a repository.
            ValueError: ``root_threshold`` is not in ``1..len(root_signers)``.
            SigningError: a signer failed.
        """
        repo = cls(store, signers, config, clock)
        if repo.roots.exists():
            raise Conflict("the image repository already exists")
        repo.roots.create(root_signers, root_threshold, signers.public_keys())
        with repo._lock:
            targets, snapshot, timestamp = Targets(), Snapshot(), Timestamp()  # all version 1
            repo._commit(
                targets, snapshot, timestamp, new_targets=True, new_snapshot=True, bump=False
            )
        return repo

    # --- reading -------------------------------------------------------------------

    def read(self, name: str) -> bytes:
        """The bytes of a served metadata file (``timestamp.json``, ``3.snapshot.json``...).

        Raises:
            MetadataNotFound: ``name`` is not a metadata file name, or no such version exists.
        """
        if not SERVED_NAME_RE.fullmatch(name):
            raise MetadataNotFound(f"no metadata named {name!r}")
        return self._store.read(name)

    def root_bytes(self) -> bytes:
        """The newest root: the trust anchor a device is given at enrolment.

        Raises:
            MetadataNotFound: the repository has not been created.
        """
        return self._store.read("root.json")

    def targets(self) -> dict[str, TargetFile]:
        """Every target, by path.

        Raises:
            MetadataNotFound: the repository has not been created.
        """
        return dict(self._signed_targets())

    def get_target(self, path: str) -> TargetFile | None:
        """The target at ``path``, or None.

        Raises:
            MetadataNotFound: the repository has not been created.
        """
        return self._signed_targets().get(path)

    def _signed_targets(self) -> dict[str, TargetFile]:
        """The current targets, parsed once per new ``timestamp.json`` (versioned snapshot
        and targets files never change, so equal timestamp bytes mean equal targets).
        Callers must not change the result."""
        stamp = self._store.read("timestamp.json")
        known = self._lookup
        if known is not None and known[0] == stamp:
            return known[1]
        targets = self._current()[2].targets
        self._lookup = (stamp, targets)
        return targets

    def _current(self) -> tuple[Timestamp, Snapshot, Targets]:
        timestamp = Metadata[Timestamp].from_bytes(self._store.read("timestamp.json")).signed
        snapshot_name = f"{timestamp.snapshot_meta.version}.snapshot.json"
        snapshot = Metadata[Snapshot].from_bytes(self._store.read(snapshot_name)).signed
        targets_name = f"{snapshot.meta['targets.json'].version}.targets.json"
        targets = Metadata[Targets].from_bytes(self._store.read(targets_name)).signed
        return timestamp, snapshot, targets

    # --- changing ------------------------------------------------------------------

    def add_target(
        self, path: str, length: int, hashes: Mapping[str, str], custom: ImageTargetCustom
    ) -> TargetFile:
        """Sign ``path`` into targets (then snapshot and timestamp). Idempotent.

        ``path`` is ``models/{name}/{version}/{variant}/{file}`` with ``custom.name`` and
        ``custom.version`` equal to the path's.

        Raises:
            TargetNameInvalid: ``path`` is unsafe or not laid out as above.
            TargetInvalid: bad length or hashes, or ``custom`` disagrees with ``path``.
            Conflict: ``path`` is already signed with other length, hashes or custom.
            MetadataNotFound: the repository has not been created.
        """
        parts = parse_model_target(path)
        if parts is None:
            raise TargetNameInvalid(f"target name {path!r} is not models/name/version/variant/file")
        if (custom.name, custom.version) != (parts.name, parts.version):
            raise TargetInvalid(f"custom name/version do not match {path!r}")
        if length < 0:
            raise TargetInvalid(f"negative length for {path!r}")
        target = TargetFile(
            length,
            check_hashes(hashes),
            path,
            {"custom": custom.model_dump(mode="json", exclude_none=True)},
        )
        with self._lock:
            timestamp, snapshot, targets = self._current()
            existing = targets.targets.get(path)
            if existing == target:
                return existing
            if existing is not None:
                raise Conflict(f"target {path!r} is already signed with other content")
            targets.targets[path] = target
            self._commit(targets, snapshot, timestamp, new_targets=True, new_snapshot=True)
        return target

    def remove_target(self, path: str) -> bool:
        """Unsign ``path``; False when it was not signed.

        Raises:
            MetadataNotFound: the repository has not been created.
        """
        with self._lock:
            timestamp, snapshot, targets = self._current()
            if targets.targets.pop(path, None) is None:
                return False
            self._commit(targets, snapshot, timestamp, new_targets=True, new_snapshot=True)
        return True

    def refresh(self) -> RefreshResult:
        """Re-sign every online role that has passed half of its lifetime.

        Call it periodically (e.g. every few minutes). The root needs the offline keys:
        the result says when it expires so the server can warn in time.

        Raises:
            MetadataNotFound: the repository has not been created.
        """
        with self._lock:
            now = self._clock()
            timestamp, snapshot, targets = self._current()
            cfg = self._config
            new_targets = targets.expires - now < cfg.targets_expiry / 2
            new_snapshot = new_targets or snapshot.expires - now < cfg.snapshot_expiry / 2
            resign = new_snapshot or timestamp.expires - now < cfg.timestamp_expiry / 2
            if resign:
                self._commit(
                    targets, snapshot, timestamp, new_targets=new_targets, new_snapshot=new_snapshot
                )
            names = [
                n for n, flag in (("targets", new_targets), ("snapshot", new_snapshot)) if flag
            ]
            resigned = (*names, "timestamp") if resign else ()
            return RefreshResult(resigned, self.roots.current().signed.expires)

    def _commit(
        self,
        targets: Targets,
        snapshot: Snapshot,
        timestamp: Timestamp,
        *,
        new_targets: bool,
        new_snapshot: bool,
        bump: bool = True,
    ) -> None:
        """Write the changed roles as new versions: targets, snapshot, then timestamp."""
        now = self._clock()
        cfg = self._config
        if new_targets:
            targets.version += int(bump)
            targets.expires = now + cfg.targets_expiry
            data = to_bytes(sign(targets, [self._signers.targets]))
            self._store.write(f"{targets.version}.targets.json", data)
            snapshot.meta["targets.json"] = MetaFile.from_data(targets.version, data, ["sha256"])
        if new_snapshot:
            snapshot.version += int(bump)
            snapshot.expires = now + cfg.snapshot_expiry
            data = to_bytes(sign(snapshot, [self._signers.snapshot]))
            self._store.write(f"{snapshot.version}.snapshot.json", data)
            timestamp.snapshot_meta = MetaFile.from_data(snapshot.version, data, ["sha256"])
        timestamp.version += int(bump)
        timestamp.expires = now + cfg.timestamp_expiry
        set_issued(timestamp, now)
        self._store.write("timestamp.json", to_bytes(sign(timestamp, [self._signers.timestamp])))
        if new_targets:
            self._prune("targets", targets.version)
        if new_snapshot:
            self._prune("snapshot", snapshot.version)

    def _prune(self, role: str, current: int) -> None:
        old = current - self._config.keep_versions
        if old >= 1:
            self._store.delete(f"{old}.{role}.json")

    # --- keys ----------------------------------------------------------------------

    def rotate_online_key(
        self, role: str, new_signer: Signer, root_signers: Sequence[Signer]
    ) -> None:
        """Replace ``role``'s key with ``new_signer``'s: a new root, then re-signed metadata.

        Raises:
            ValueError: ``role`` is not targets, snapshot or timestamp.
            SigningError: ``root_signers`` do not meet the root threshold.
        """
        with self._lock:
            self.roots.rotate_online_key(role, new_signer.public_key, root_signers)
            self._signers = self._signers.with_role(role, new_signer)
            self._resign_all()

    def rotate_root(
        self, old_signers: Sequence[Signer], new_signers: Sequence[Signer], threshold: int
    ) -> None:
        """Replace the root keys (signed by a threshold of the old and of the new keys).

        Raises:
            ValueError: ``threshold`` is not in ``1..len(new_signers)``.
            SigningError: either threshold is not met.
        """
        with self._lock:
            self.roots.rotate_root(old_signers, new_signers, threshold)
            self._resign_all()

    def renew_root(self, root_signers: Sequence[Signer]) -> None:
        """Publish the root again with a fresh expiry (needs the offline keys).

        Raises:
            SigningError: ``root_signers`` do not meet the root threshold.
        """
        with self._lock:
            self.roots.renew(root_signers)
            self._resign_all()

    def _resign_all(self) -> None:
        timestamp, snapshot, targets = self._current()
        self._commit(targets, snapshot, timestamp, new_targets=True, new_snapshot=True)


def custom_of(target: TargetFile) -> dict[str, Any]:
    """The ``custom`` object of ``target`` (empty when it has none)."""
    custom = target.unrecognized_fields.get("custom")
    return dict(custom) if isinstance(custom, dict) else {}
