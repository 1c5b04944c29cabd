"""The director (Uptane): a small TUF repository per device, naming what it must run.

Every device shares the director's root (``{N}.root.json``); its targets, snapshot and
timestamp are generated on demand from the device's desired assignments and served under
``/tuf/director/{device}/``.

**Versions without per-request state.** Metadata is a pure function of (device, the
assignments, their *revision*, the root version, the clock's epoch), so any replica builds
the same metadata, and a snapshot fetched a moment after its timestamp can be rebuilt:

* ``revision`` R increases whenever the device's assignments change. It comes from the
  server's database when the caller passes it; otherwise the director keeps it in the store
  (``devices/{id}/revision.json``, bumped when the assignments' digest changes).
* Targets and snapshot are re-signed every half of their lifetime: epoch
  ``e = floor(t / (min(targets, snapshot lifetime) / 2))``; the timestamp every half of its
  own: ``e_t = floor(t / (timestamp lifetime / 2))``.
* ``targets.version = snapshot.version = R + e + root_version`` and
  ``timestamp.version = R + e + e_t + root_version``. Each term never decreases, so a sum
  grows whenever any term does: a changed assignment, a new epoch or a key rotation always
  gives strictly higher versions; equal inputs give equal metadata.
* ``issued``/``expires`` are aligned on the epoch start, so the metadata has at least half of
  its lifetime left when served.

Snapshot and timestamp name the files they cover by version only (no hashes): a
re-built file with a non-deterministic signature (ECDSA, HSM) still matches.

**Built once, served from memory.** A device's check reads ``timestamp.json`` and then the
snapshot and targets it names. The signed files are kept in a bounded cache keyed by
(device, version) for ``cache_ttl_s``: the snapshot and targets requests that follow, and
repeated polls with unchanged assignments, are answered without signing again
(:meth:`Director.cached` needs no assignments, so the server answers them without its
database). Another replica that misses the cache builds the same metadata.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, Field, model_validator

# The defining modules: tuf.api.metadata and securesystemslib.signer re-export these names
# only implicitly, which mypy --strict refuses.
from securesystemslib.signer._signer import Signer
from tuf.api._payload import MetaFile, Snapshot, TargetFile, Targets, Timestamp

from agent.updater.targets import (
    ID_PATTERN,
    DirectorTargetCustom,
    is_safe_device_id,
    parse_model_target,
)
from fleet_server.errors import Conflict, ValidationError
from fleet_server.tuf.errors import MetadataNotFound, TargetNameInvalid
from fleet_server.tuf.image_repo import check_hashes
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

_VERSIONED_RE = re.compile(r"([1-9][0-9]{0,15})\.(root|snapshot|targets)\.json")


class DirectorConfig(BaseModel):
    """Lifetimes of the director's metadata (short: a device polls often)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    root_expiry: timedelta = timedelta(days=365)
    targets_expiry: timedelta = Field(default=timedelta(days=1), ge=timedelta(minutes=2))
    snapshot_expiry: timedelta = Field(default=timedelta(days=1), ge=timedelta(minutes=2))
    timestamp_expiry: timedelta = Field(default=timedelta(hours=1), ge=timedelta(minutes=2))
    #: How long built snapshot/targets files stay in memory, and how many (0: no cache).
    cache_ttl_s: float = Field(default=120.0, ge=0)
    cache_entries: int = Field(default=16_384, ge=0)


class Assignment(BaseModel):
    """One artifact a device must run: the image target and why (rollout, profile)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str
    length: int = Field(ge=0)
    hashes: dict[str, str]
    name: str
    version: str
    variant: str
    profile: str = Field(pattern=ID_PATTERN)
    rollout_id: str | None = Field(default=None, max_length=128)

    @model_validator(mode="after")
    def _path_matches(self) -> Assignment:
        parts = parse_model_target(self.path)
        if parts is None:
            raise ValueError(f"target name {self.path!r} is not models/name/version/variant/file")
        if (parts.name, parts.version, parts.variant) != (self.name, self.version, self.variant):
            raise ValueError(f"name/version/variant do not match {self.path!r}")
        return self

    @classmethod
    def for_target(
        cls, target: TargetFile, *, profile: str, rollout_id: str | None = None
    ) -> Assignment:
        """The assignment of an image-repository target (length and hashes copied).

        Raises:
            pydantic.ValidationError: the target's path is not a model target path.
        """
        parts = parse_model_target(target.path)
        name, version, variant = parts[:3] if parts else ("", "", "")
        return cls(
            path=target.path,
            length=target.length,
            hashes=target.hashes,
            name=name,
            version=version,
            variant=variant,
            profile=profile,
            rollout_id=rollout_id,
        )


@dataclass(frozen=True)
class DirectorMetadata:
    """The signed metadata of one device, as served."""

    device_id: str
    revision: int
    root_version: int
    root: bytes
    targets_version: int
    targets: bytes
    snapshot: bytes
    timestamp_version: int
    timestamp: bytes

    @property
    def files(self) -> dict[str, bytes]:
        """Served name → bytes, e.g. ``timestamp.json``, ``40571.snapshot.json``."""
        return {
            f"{self.root_version}.root.json": self.root,
            "root.json": self.root,
            f"{self.targets_version}.targets.json": self.targets,
            f"{self.targets_version}.snapshot.json": self.snapshot,
            "timestamp.json": self.timestamp,
        }


@dataclass(frozen=True)
class _Built:
    """A device's signed targets and snapshot of one version, and what they were built from."""

    digest: str
    revision: int
    targets: bytes
    snapshot: bytes
    born: float


def check_device_id(device_id: str) -> str:
    """Return ``device_id`` when it is a safe device id.

    Raises:
        ValidationError: not ``[A-Za-z0-9_.-]{1,64}``, or ``.``/``..``.
    """
    if not is_safe_device_id(device_id):
        raise ValidationError(f"invalid device id {device_id!r}", code="device_id_invalid")
    return device_id


def assignments_digest(assignments: Sequence[Assignment]) -> str:
    """A sha256 over the assignments, independent of their order."""
    items = sorted(json.dumps(a.model_dump(mode="json"), sort_keys=True) for a in assignments)
    return hashlib.sha256("\n".join(items).encode()).hexdigest()


class Director:
    """Builds, signs and serves per-device director metadata."""

    def __init__(
        self,
        store: MetadataStore,
        signers: RoleSigners,
        config: DirectorConfig | None = None,
        clock: Clock = utc_now,
    ) -> None:
        self._store = store
        self._signers = signers
        self._config = config or DirectorConfig()
        self._clock = clock
        self.roots = RootChain(store, self._config.root_expiry, clock)
        self._built: OrderedDict[tuple[str, int], _Built] = OrderedDict()
        self._built_lock = threading.Lock()

    @classmethod
    def create(
        cls,
        store: MetadataStore,
        root_signers: Sequence[Signer],
        root_threshold: int,
        signers: RoleSigners,
        *,
        config: DirectorConfig | None = None,
        clock: Clock = utc_now,
    ) -> Director:
        """Create the director's root (version 1).

        Raises:
            Conflict: the store already holds a director root.
            ValueError: ``root_threshold`` is not in ``1..len(root_signers)``.
            SigningError: a signer failed.
        """
        director = cls(store, signers, config, clock)
        if director.roots.exists():
            raise Conflict("the director repository already exists")
        director.roots.create(root_signers, root_threshold, signers.public_keys())
        return director

    def root_bytes(self) -> bytes:
        """The newest director root: the trust anchor a device is given at enrolment.

        Raises:
            MetadataNotFound: the director has not been created.
        """
        return self._store.read("root.json")

    # --- per-device metadata -------------------------------------------------------

    def metadata_for(
        self,
        device_id: str,
        assignments: Sequence[Assignment],
        revision: int | None = None,
        *,
        now: datetime | None = None,
    ) -> DirectorMetadata:
        """The device's signed metadata for ``assignments`` at ``now`` (default: the clock).

        ``revision`` is the database's per-device revision of the assignments; it must
        increase whenever they change. Without it the director counts revisions itself.

        Raises:
            ValidationError: bad device id, or a negative revision.
            Conflict: two assignments name the same target path.
            MetadataNotFound: the director has not been created.
        """
        check_device_id(device_id)
        rev = self._revision(device_id, assignments, revision)
        now = now or self._clock()
        root_version = self.roots.current_version()
        epoch = self._epoch(now)
        version = rev + epoch + root_version
        digest = assignments_digest(assignments)
        built = self._lookup(device_id, version)
        if built is None or (built.digest, built.revision) != (digest, rev):
            targets, snapshot = self._targets_and_snapshot(device_id, assignments, version, epoch)
            built = _Built(digest, rev, targets, snapshot, time.monotonic())
            self._remember(device_id, version, built)
        targets, snapshot = built.targets, built.snapshot
        t_step = self._config.timestamp_expiry / 2
        t_epoch = int(now.timestamp() // t_step.total_seconds())
        issued = datetime.fromtimestamp(t_epoch * t_step.total_seconds(), UTC)
        ts = Timestamp(
            version=version + t_epoch,
            expires=issued + self._config.timestamp_expiry,
            snapshot_meta=MetaFile(version),
        )
        set_issued(ts, issued)
        return DirectorMetadata(
            device_id=device_id,
            revision=rev,
            root_version=root_version,
            root=self.roots.read(root_version),
            targets_version=version,
            targets=targets,
            snapshot=snapshot,
            timestamp_version=ts.version,
            timestamp=to_bytes(sign(ts, [self._signers.timestamp])),
        )

    def serve(
        self,
        device_id: str,
        name: str,
        assignments: Sequence[Assignment],
        revision: int | None = None,
    ) -> bytes:
        """The bytes served at ``/tuf/director/{device_id}/{name}``.

        Versioned snapshot and targets files are served for the current epoch and the one
        before it (a client that read the timestamp just before the epoch turned).

        Raises:
            MetadataNotFound: no such file or version.
            ValidationError: bad device id.
        """
        check_device_id(device_id)
        if name == "root.json":
            return self.root_bytes()
        if name == "timestamp.json":
            return self.metadata_for(device_id, assignments, revision).timestamp
        match = _VERSIONED_RE.fullmatch(name)
        if match is None:
            raise MetadataNotFound(f"no director metadata named {name!r}")
        version, role = int(match[1]), match[2]
        if role == "root":
            return self.roots.read(version)
        rev = self._revision(device_id, assignments, revision)
        epoch = version - rev - self.roots.current_version()
        current = self._epoch(self._clock())
        if epoch not in {current, current - 1}:
            raise MetadataNotFound(f"director {role} version {version} is not available")
        targets, snapshot = self._targets_and_snapshot(device_id, assignments, version, epoch)
        return targets if role == "targets" else snapshot

    def cached(self, device_id: str, name: str) -> bytes | None:
        """``{N}.snapshot.json`` or ``{N}.targets.json`` of ``device_id`` when this process
        built it within ``cache_ttl_s`` (for the timestamp that names it), else None."""
        match = _VERSIONED_RE.fullmatch(name)
        if match is None or match[2] == "root":
            return None
        built = self._lookup(device_id, int(match[1]))
        if built is None:
            return None
        return built.targets if match[2] == "targets" else built.snapshot

    def _lookup(self, device_id: str, version: int) -> _Built | None:
        ttl = self._config.cache_ttl_s
        with self._built_lock:
            built = self._built.get((device_id, version))
        if built is None or time.monotonic() - built.born > ttl:
            return None
        return built

    def _remember(self, device_id: str, version: int, built: _Built) -> None:
        cfg = self._config
        if cfg.cache_entries == 0 or cfg.cache_ttl_s == 0:
            return
        with self._built_lock:
            self._built[(device_id, version)] = built
            self._built.move_to_end((device_id, version))
            oldest = built.born - cfg.cache_ttl_s
            while self._built and (
                len(self._built) > cfg.cache_entries
                or next(iter(self._built.values())).born < oldest
            ):
                self._built.popitem(last=False)

    def _epoch(self, now: datetime) -> int:
        cfg = self._config
        step = min(cfg.targets_expiry, cfg.snapshot_expiry) / 2
        return int(now.timestamp() // step.total_seconds())

    def _targets_and_snapshot(
        self, device_id: str, assignments: Sequence[Assignment], version: int, epoch: int
    ) -> tuple[bytes, bytes]:
        cfg = self._config
        step = min(cfg.targets_expiry, cfg.snapshot_expiry) / 2
        issued = datetime.fromtimestamp(epoch * step.total_seconds(), UTC)
        targets = Targets(version=version, expires=issued + cfg.targets_expiry)
        for a in assignments:
            if a.path in targets.targets:
                raise Conflict(f"target {a.path!r} is assigned twice to {device_id}")
            if parse_model_target(a.path) is None:  # an Assignment built without validation
                raise TargetNameInvalid(f"target name {a.path!r} is unsafe")
            custom = DirectorTargetCustom(
                device_id=device_id,
                rollout_id=a.rollout_id,
                name=a.name,
                version=a.version,
                variant=a.variant,
                profile=a.profile,
            )
            targets.targets[a.path] = TargetFile(
                a.length,
                check_hashes(a.hashes),
                a.path,
                {"custom": custom.model_dump(mode="json", exclude_none=True)},
            )
        targets_bytes = to_bytes(sign(targets, [self._signers.targets]))
        snapshot = Snapshot(
            version=version,
            expires=issued + cfg.snapshot_expiry,
            meta={"targets.json": MetaFile(version)},
        )
        return targets_bytes, to_bytes(sign(snapshot, [self._signers.snapshot]))

    def _revision(
        self, device_id: str, assignments: Sequence[Assignment], revision: int | None
    ) -> int:
        if revision is not None:
            if revision < 0:
                raise ValidationError(f"negative revision {revision}")
            return revision
        name = f"devices/{device_id}/revision.json"
        digest = assignments_digest(assignments)
        try:
            state = json.loads(self._store.read(name))
        except MetadataNotFound:
            state = {"revision": 0, "digest": None}
        if state["digest"] != digest:
            state = {"revision": int(state["revision"]) + 1, "digest": digest}
            self._store.write(name, json.dumps(state).encode())
        return int(state["revision"])

    # --- keys ----------------------------------------------------------------------

    def rotate_online_key(
        self, role: str, new_signer: Signer, root_signers: Sequence[Signer]
    ) -> None:
        """Replace ``role``'s key with ``new_signer``'s (a new director root).

        Every device's metadata version grows with the root version, so devices fetch
        metadata signed by the new key at their next poll.

        Raises:
            ValueError: ``role`` is not targets, snapshot or timestamp.
            SigningError: ``root_signers`` do not meet the root threshold.
        """
        self.roots.rotate_online_key(role, new_signer.public_key, root_signers)
        self._signers = self._signers.with_role(role, new_signer)

    def rotate_root(
        self, old_signers: Sequence[Signer], new_signers: Sequence[Signer], threshold: int
    ) -> None:
        """Replace the director's root keys (signed by both thresholds).

        Raises:
            ValueError: ``threshold`` is not in ``1..len(new_signers)``.
            SigningError: either threshold is not met.
        """
        self.roots.rotate_root(old_signers, new_signers, threshold)

    def renew_root(self, root_signers: Sequence[Signer]) -> None:
        """Publish the director root again with a fresh expiry (needs the offline keys).

        Raises:
            SigningError: ``root_signers`` do not meet the root threshold.
        """
        self.roots.renew(root_signers)
