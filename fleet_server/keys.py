"""Signing keys: generation, loading and rotation (``edge-fleet keys init|rotate``).

Two places hold keys, all ed25519, PKCS#8 PEM, file mode 0600 in 0700 folders:

* the **offline** folder, chosen by the operator (a USB stick, an air-gapped laptop):
  the root keys, ``root-{keyid16}.pem``, optionally passphrase-encrypted. They sign the
  roots of both repositories; a threshold of them is needed. Rotated-out keys move to
  ``retired/``.
* the **online** folder, in the server's data dir: ``image-targets.pem``,
  ``image-snapshot.pem``, ``image-timestamp.pem``, ``director-targets.pem``,
  ``director-snapshot.pem``, ``director-timestamp.pem``.

A rotation publishes the new root first and writes the new key file last; the new key is
staged as ``*.next.pem`` until then, so an interrupted rotation loses nothing.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

# The defining modules: tuf.api.metadata and securesystemslib.signer re-export these names
# only implicitly, which mypy --strict refuses.
from securesystemslib.signer._crypto_signer import CryptoSigner

from fleet_server.errors import ConfigError
from fleet_server.tuf.director import Director, DirectorConfig
from fleet_server.tuf.image_repo import ImageRepoConfig, ImageRepository
from fleet_server.tuf.signing import RoleSigners
from fleet_server.tuf.storage import MetadataStore

Repo = Literal["image", "director"]


class KeysError(ConfigError):
    """Keys that are missing, unreadable, exposed (not 0600) or already there."""

    code = "keys_invalid"


class KeyRole(StrEnum):
    """A key that can be rotated; online roles are ``{repository}-{role}``."""

    ROOT = "root"
    IMAGE_TARGETS = "image-targets"
    IMAGE_SNAPSHOT = "image-snapshot"
    IMAGE_TIMESTAMP = "image-timestamp"
    DIRECTOR_TARGETS = "director-targets"
    DIRECTOR_SNAPSHOT = "director-snapshot"
    DIRECTOR_TIMESTAMP = "director-timestamp"

    @property
    def repo(self) -> Repo:
        """``image`` or ``director`` (the root role signs both)."""
        return "director" if self.value.startswith("director") else "image"

    @property
    def tuf_role(self) -> str:
        """The TUF role name: root, targets, snapshot or timestamp."""
        return self.value.rsplit("-", 1)[-1]


ONLINE_KEY_ROLES = tuple(r for r in KeyRole if r is not KeyRole.ROOT)


@dataclass(frozen=True)
class KeyInventory:
    """The key ids made by :func:`init_keys` (public information)."""

    root_keyids: tuple[str, ...]
    root_threshold: int
    online_keyids: dict[KeyRole, str]


# --- files ---------------------------------------------------------------------------


def _private_dir(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    return path


def _write_key(path: Path, key: Ed25519PrivateKey, passphrase: bytes | None = None) -> None:
    """Write ``key`` as PKCS#8 PEM, mode 0600, atomically (never over an existing file)."""
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, pem)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.link(tmp, path)  # fails when ``path`` exists
    tmp.unlink()


def _load_key(path: Path, passphrase: bytes | None = None) -> CryptoSigner:
    """Load an ed25519 signer from ``path``, refusing a file others can read."""
    try:
        mode = path.stat().st_mode
        data = path.read_bytes()
    except OSError as e:
        raise KeysError(f"cannot read key {path}: {e.strerror}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeysError(f"key {path} is readable by others (chmod 600 it)")
    try:
        key = serialization.load_pem_private_key(data, passphrase)
    except (ValueError, TypeError) as e:
        raise KeysError(f"cannot load key {path}: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeysError(f"key {path} is not an ed25519 key")
    return CryptoSigner(key)


def _new_root_keys(offline_dir: Path, count: int, passphrase: bytes | None, sub: str) -> list[Path]:
    folder = _private_dir(offline_dir / sub) if sub else offline_dir
    paths = []
    for _ in range(count):
        key = Ed25519PrivateKey.generate()
        keyid = CryptoSigner(key).public_key.keyid
        path = folder / f"root-{keyid[:16]}.pem"
        _write_key(path, key, passphrase)
        paths.append(path)
    return paths


# --- public API ----------------------------------------------------------------------


def init_keys(
    offline_dir: Path,
    online_dir: Path,
    root_threshold: int = 2,
    root_count: int = 3,
    *,
    passphrase: bytes | None = None,
) -> KeyInventory:
    """Generate ``root_count`` root keys in ``offline_dir`` and the online keys.

    Raises:
        KeysError: keys already exist in either folder, or both are the same folder.
        ValueError: ``root_threshold`` is not in ``1..root_count``.
        OSError: a folder cannot be created or written.
    """
    if not 1 <= root_threshold <= root_count:
        raise ValueError(f"root threshold {root_threshold} with {root_count} keys")
    if offline_dir.resolve() == online_dir.resolve():
        raise KeysError("the offline root keys must not share the online key folder")
    _private_dir(offline_dir)
    _private_dir(online_dir)
    if list(offline_dir.glob("root-*.pem")):
        raise KeysError(f"{offline_dir} already holds root keys")
    if any((online_dir / f"{r}.pem").exists() for r in ONLINE_KEY_ROLES):
        raise KeysError(f"{online_dir} already holds online keys")
    roots = [
        _load_key(p, passphrase) for p in _new_root_keys(offline_dir, root_count, passphrase, "")
    ]
    online: dict[KeyRole, str] = {}
    for role in ONLINE_KEY_ROLES:
        key = Ed25519PrivateKey.generate()
        _write_key(online_dir / f"{role}.pem", key)
        online[role] = CryptoSigner(key).public_key.keyid
    return KeyInventory(tuple(s.public_key.keyid for s in roots), root_threshold, online)


def load_root_signers(offline_dir: Path, passphrase: bytes | None = None) -> list[CryptoSigner]:
    """The root signers whose keys are in ``offline_dir`` (not ``retired/``).

    Raises:
        KeysError: no root key there, or one that cannot be loaded or is exposed.
    """
    paths = sorted(offline_dir.glob("root-*.pem"))
    if not paths:
        raise KeysError(f"no root keys in {offline_dir}")
    return [_load_key(p, passphrase) for p in paths]


def load_online_signers(online_dir: Path, repo: Repo) -> RoleSigners:
    """The targets, snapshot and timestamp signers of ``repo`` (``image`` or ``director``).

    Raises:
        KeysError: a key is missing, unreadable or exposed.
    """
    signers = {
        r: _load_key(online_dir / f"{repo}-{r}.pem") for r in ("targets", "snapshot", "timestamp")
    }
    return RoleSigners(**signers)


def init_repositories(
    offline_dir: Path,
    online_dir: Path,
    image_store: MetadataStore,
    director_store: MetadataStore,
    *,
    root_threshold: int = 2,
    passphrase: bytes | None = None,
    image_config: ImageRepoConfig | None = None,
    director_config: DirectorConfig | None = None,
) -> tuple[ImageRepository, Director]:
    """Create both repositories (root v1 each) from the keys :func:`init_keys` made.

    Raises:
        KeysError: keys are missing or unreadable.
        Conflict: a repository already exists.
        SigningError: the root keys present do not meet ``root_threshold``.
    """
    roots = load_root_signers(offline_dir, passphrase)
    image = ImageRepository.create(
        image_store,
        roots,
        root_threshold,
        load_online_signers(online_dir, "image"),
        config=image_config,
    )
    director = Director.create(
        director_store,
        roots,
        root_threshold,
        load_online_signers(online_dir, "director"),
        config=director_config,
    )
    return image, director


def rotate_role(
    role: KeyRole,
    *,
    offline_dir: Path,
    online_dir: Path,
    image: ImageRepository,
    director: Director,
    passphrase: bytes | None = None,
    new_root_count: int | None = None,
    new_root_threshold: int | None = None,
) -> list[str]:
    """Replace ``role``'s key(s) and publish new roots; returns the new key ids.

    For ``root`` the new roots of both repositories are signed by the old root keys
    present in ``offline_dir`` and by the new ones (count and threshold default to the
    current ones); the old key files move to ``retired/``. For an online role the new
    key replaces ``{role}.pem`` once the new root is published.

    Raises:
        KeysError: a key is missing, unreadable or exposed.
        SigningError: the root keys present do not meet the root threshold.
        ValueError: the new threshold is not in ``1..new_root_count``.
    """
    old_roots = load_root_signers(offline_dir, passphrase)
    if role is KeyRole.ROOT:
        return _rotate_root(
            offline_dir,
            old_roots,
            image,
            director,
            passphrase=passphrase,
            count=new_root_count,
            threshold=new_root_threshold,
        )
    repo: ImageRepository | Director = image if role.repo == "image" else director
    final, staged = online_dir / f"{role}.pem", online_dir / f"{role}.next.pem"
    if staged.exists():  # an interrupted rotation: keep its key if a root already trusts it
        trusted = repo.roots.current().signed.roles[role.tuf_role].keyids
        if _load_key(staged).public_key.keyid in trusted:
            os.replace(staged, final)
        else:
            staged.unlink()
    _write_key(staged, Ed25519PrivateKey.generate())
    signer = _load_key(staged)
    try:
        repo.rotate_online_key(role.tuf_role, signer, old_roots)
    except BaseException:
        if signer.public_key.keyid not in repo.roots.current().signed.roles[role.tuf_role].keyids:
            staged.unlink()  # nothing trusts it: forget it
        raise
    os.replace(staged, final)
    return [signer.public_key.keyid]


def _rotate_root(
    offline_dir: Path,
    old_roots: Sequence[CryptoSigner],
    image: ImageRepository,
    director: Director,
    *,
    passphrase: bytes | None,
    count: int | None,
    threshold: int | None,
) -> list[str]:
    current = image.roots.current().signed.roles["root"]
    count = count or len(current.keyids)
    threshold = threshold or current.threshold
    if not 1 <= threshold <= count:
        raise ValueError(f"root threshold {threshold} with {count} keys")
    if list((offline_dir / "next").glob("*.pem")):
        raise KeysError(
            f"{offline_dir / 'next'} holds keys of an interrupted root rotation: compare them "
            "with the key ids of the newest root.json, keep or delete them, then retry"
        )
    staged = _new_root_keys(offline_dir, count, passphrase, "next")
    new_roots = [_load_key(p, passphrase) for p in staged]
    image.rotate_root(old_roots, new_roots, threshold)
    director.rotate_root(old_roots, new_roots, threshold)
    retired = _private_dir(offline_dir / "retired")
    for old in offline_dir.glob("root-*.pem"):
        os.replace(old, retired / old.name)
    for path in staged:
        os.replace(path, offline_dir / path.name)
    (offline_dir / "next").rmdir()
    return [s.public_key.keyid for s in new_roots]
