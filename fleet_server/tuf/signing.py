"""Signing shared by the image repository and the director: signers, roots and their rotation.

Every metadata file is built with python-tuf's Metadata API and serialised as compact,
key-sorted JSON. Roots and timestamps carry an extra signed field, ``x-edge-fleet-issued``
(RFC 3339), that devices use to notice a clock set earlier than metadata they trust.

:class:`RootChain` owns the ``{N}.root.json`` files of one repository. Each new root is
signed by a threshold of the *previous* root's keys and of its own, and is checked with
python-tuf before it is written, so a device walking ``1.root.json → N.root.json``
accepts every step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

# The defining modules: tuf.api.metadata and securesystemslib.signer re-export these names
# only implicitly, which mypy --strict refuses.
from securesystemslib.signer._key import Key
from securesystemslib.signer._signer import Signer
from tuf.api._payload import TOP_LEVEL_ROLE_NAMES, Role, Root, Signed, T
from tuf.api.metadata import Metadata
from tuf.api.serialization.json import JSONSerializer

from agent.updater.targets import ISSUED_FIELD
from fleet_server.tuf.errors import MetadataNotFound, SigningError
from fleet_server.tuf.storage import MetadataStore

ONLINE_ROLES = ("targets", "snapshot", "timestamp")

Clock = Callable[[], datetime]

_SERIALIZER = JSONSerializer(compact=True)


def utc_now() -> datetime:
    """Now, in UTC, to the second (TUF expiry times have no sub-second part)."""
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class RoleSigners:
    """The online signers of one repository's targets, snapshot and timestamp roles."""

    targets: Signer
    snapshot: Signer
    timestamp: Signer

    def for_role(self, role: str) -> Signer:
        """The signer of ``role`` (``targets``, ``snapshot`` or ``timestamp``).

        Raises:
            ValueError: ``role`` is not an online role.
        """
        if role not in ONLINE_ROLES:
            raise ValueError(f"{role!r} is not an online role")
        signer: Signer = getattr(self, role)
        return signer

    def with_role(self, role: str, signer: Signer) -> RoleSigners:
        """A copy with ``role`` signed by ``signer``.

        Raises:
            ValueError: ``role`` is not an online role.
        """
        if role not in ONLINE_ROLES:
            raise ValueError(f"{role!r} is not an online role")
        return replace(self, **{role: signer})

    def public_keys(self) -> dict[str, Key]:
        """Role name → public key."""
        return {role: self.for_role(role).public_key for role in ONLINE_ROLES}


def set_issued(signed: Signed, when: datetime) -> None:
    """Record ``when`` as the signed issue time of ``signed``."""
    signed.unrecognized_fields[ISSUED_FIELD] = when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def issued_at(signed: Signed) -> datetime | None:
    """The signed issue time of ``signed``, or None when it has none (or a malformed one)."""
    value = signed.unrecognized_fields.get(ISSUED_FIELD)
    if not isinstance(value, str):
        return None
    try:
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except ValueError:
        return None


def sign(signed: T, signers: Sequence[Signer]) -> Metadata[T]:
    """``signed`` wrapped in Metadata and signed by every one of ``signers``.

    Raises:
        SigningError: a signer failed.
    """
    md = Metadata(signed)
    try:
        for signer in signers:
            md.sign(signer, append=True)
    except Exception as e:
        raise SigningError(f"cannot sign {signed.type}: {e}") from e
    return md


def to_bytes(md: Metadata[Any]) -> bytes:
    """The bytes served for ``md`` (compact JSON, keys sorted: stable for equal content)."""
    return md.to_bytes(_SERIALIZER)


class RootChain:
    """The root metadata versions of one repository, stored as ``{N}.root.json``."""

    def __init__(self, store: MetadataStore, lifetime: timedelta, clock: Clock) -> None:
        self._store = store
        self._lifetime = lifetime
        self._clock = clock
        self._version: tuple[bytes, int] | None = None  # (root.json bytes, its version)

    def exists(self) -> bool:
        """True when the repository has a root."""
        try:
            self._store.read("root.json")
        except MetadataNotFound:
            return False
        return True

    def current(self) -> Metadata[Root]:
        """The newest root.

        Raises:
            MetadataNotFound: the repository has not been created.
        """
        return Metadata[Root].from_bytes(self._store.read("root.json"))

    def current_version(self) -> int:
        """The newest root's version (parsed once per change of ``root.json``).

        Raises:
            MetadataNotFound: the repository has not been created.
        """
        data = self._store.read("root.json")
        known = self._version
        if known is not None and known[0] == data:
            return known[1]
        version = Metadata[Root].from_bytes(data).signed.version
        self._version = (data, version)
        return version

    def read(self, version: int) -> bytes:
        """The bytes of root ``version``.

        Raises:
            MetadataNotFound: there is no such version.
        """
        return self._store.read(f"{version}.root.json")

    def create(
        self, root_signers: Sequence[Signer], threshold: int, online: Mapping[str, Key]
    ) -> Metadata[Root]:
        """Write root version 1: the root role is ``root_signers``' keys with ``threshold``.

        Raises:
            ValueError: the threshold is not in ``1..len(root_signers)`` or a role has no key.
            SigningError: the signatures do not meet the threshold.
        """
        if not 1 <= threshold <= len(root_signers):
            raise ValueError(f"root threshold {threshold} with {len(root_signers)} keys")
        root = Root(version=1, roles={r: Role([], 1) for r in TOP_LEVEL_ROLE_NAMES})
        for signer in root_signers:
            root.add_key(signer.public_key, Root.type)
        root.roles[Root.type].threshold = threshold
        for role in ONLINE_ROLES:
            root.add_key(online[role], role)
        return self._publish(root, root_signers, previous=None)

    def rotate_online_key(
        self, role: str, new_key: Key, root_signers: Sequence[Signer]
    ) -> Metadata[Root]:
        """Publish a root where ``new_key`` alone signs ``role`` (the old keys are revoked).

        Raises:
            ValueError: ``role`` is not an online role.
            SigningError: ``root_signers`` do not meet the current root threshold.
        """
        if role not in ONLINE_ROLES:
            raise ValueError(f"{role!r} is not an online role")
        root = self._next()
        for keyid in list(root.roles[role].keyids):
            root.revoke_key(keyid, role)
        root.add_key(new_key, role)
        return self._publish(root, root_signers, previous=self.current().signed)

    def rotate_root(
        self,
        old_signers: Sequence[Signer],
        new_signers: Sequence[Signer],
        threshold: int,
    ) -> Metadata[Root]:
        """Publish a root whose root role is ``new_signers``' keys with ``threshold``.

        It is signed by ``old_signers`` (a threshold of the current root keys) and by
        ``new_signers`` (a threshold of the new ones).

        Raises:
            ValueError: the threshold is not in ``1..len(new_signers)``.
            SigningError: either threshold is not met.
        """
        if not 1 <= threshold <= len(new_signers):
            raise ValueError(f"root threshold {threshold} with {len(new_signers)} keys")
        root = self._next()
        for keyid in list(root.roles[Root.type].keyids):
            root.revoke_key(keyid, Root.type)
        for signer in new_signers:
            root.add_key(signer.public_key, Root.type)
        root.roles[Root.type].threshold = threshold
        return self._publish(root, [*old_signers, *new_signers], previous=self.current().signed)

    def renew(self, root_signers: Sequence[Signer]) -> Metadata[Root]:
        """Publish the same root as a new version with a fresh expiry.

        Raises:
            SigningError: ``root_signers`` do not meet the root threshold.
        """
        return self._publish(self._next(), root_signers, previous=self.current().signed)

    def _next(self) -> Root:
        root = self.current().signed
        root.version += 1
        return root

    def _publish(
        self, root: Root, signers: Sequence[Signer], previous: Root | None
    ) -> Metadata[Root]:
        now = self._clock()
        root.expires = now + self._lifetime
        set_issued(root, now)
        unique = {s.public_key.keyid: s for s in signers}
        md = sign(root, list(unique.values()))
        result = root.get_root_verification_result(previous, md.signed_bytes, md.signatures)
        if not result.verified:
            first, second = result.first, result.second
            raise SigningError(
                f"root v{root.version} has {len(first.signed)}/{first.threshold} signatures of "
                f"the previous root keys and {len(second.signed)}/{second.threshold} of its own"
            )
        data = to_bytes(md)
        self._store.write(f"{root.version}.root.json", data)
        self._store.write("root.json", data)
        return md
