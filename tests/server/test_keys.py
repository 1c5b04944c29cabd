"""Key files (offline root keys, online role keys) and their rotation."""

from __future__ import annotations

import stat
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from tuf.api._payload import Root
from tuf.api.metadata import Metadata

from fleet_server import keys
from fleet_server.keys import KeyRole, KeysError
from fleet_server.tuf import Director, ImageRepository, MemoryStore, SigningError


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@dataclass
class Env:
    offline: Path
    online: Path
    image: ImageRepository
    director: Director

    def rotate(self, role: KeyRole, **root: int) -> list[str]:
        return keys.rotate_role(
            role,
            offline_dir=self.offline,
            online_dir=self.online,
            image=self.image,
            director=self.director,
            **root,  # type: ignore[arg-type]
        )


@pytest.fixture
def offline(tmp_path: Path) -> Path:
    return tmp_path / "offline"


@pytest.fixture
def online(tmp_path: Path) -> Path:
    return tmp_path / "data/keys"


@pytest.fixture
def env(offline: Path, online: Path) -> Env:
    keys.init_keys(offline, online, root_threshold=2, root_count=3)
    image, director = keys.init_repositories(offline, online, MemoryStore(), MemoryStore())
    return Env(offline, online, image, director)


def test_init_writes_private_pem_keys(offline: Path, online: Path) -> None:
    inventory = keys.init_keys(offline, online, root_threshold=2, root_count=3)
    root_files = sorted(offline.glob("root-*.pem"))
    assert len(root_files) == 3 and len(inventory.root_keyids) == 3
    assert inventory.root_threshold == 2
    assert sorted(p.name for p in online.iterdir()) == sorted(
        f"{r}.pem" for r in keys.ONLINE_KEY_ROLES
    )
    for path in [*root_files, *online.iterdir()]:
        assert mode(path) == 0o600
        assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert mode(offline) == mode(online) == 0o700
    signer = keys.load_online_signers(online, "director").timestamp
    assert signer.public_key.keyid == inventory.online_keyids[KeyRole.DIRECTOR_TIMESTAMP]
    assert {s.public_key.keyid for s in keys.load_root_signers(offline)} == set(
        inventory.root_keyids
    )
    with pytest.raises(KeysError, match="already holds"):
        keys.init_keys(offline, online)
    with pytest.raises(ValueError, match="threshold"):
        keys.init_keys(offline / "x", online / "x", root_threshold=4, root_count=3)


def test_exposed_or_missing_keys_are_refused(offline: Path, online: Path) -> None:
    keys.init_keys(offline, online)
    exposed = online / "image-targets.pem"
    exposed.chmod(0o644)
    with pytest.raises(KeysError, match="readable by others"):
        keys.load_online_signers(online, "image")
    (online / "director-snapshot.pem").unlink()
    with pytest.raises(KeysError, match="cannot read"):
        keys.load_online_signers(online, "director")
    with pytest.raises(KeysError, match="no root keys"):
        keys.load_root_signers(online)


def test_offline_keys_can_be_passphrase_protected(offline: Path, online: Path) -> None:
    keys.init_keys(offline, online, passphrase=b"correct horse")
    pem = next(offline.glob("root-*.pem")).read_bytes()
    assert pem.startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    assert len(keys.load_root_signers(offline, b"correct horse")) == 3
    with pytest.raises(KeysError, match="cannot load"):
        keys.load_root_signers(offline, b"wrong")


@pytest.mark.parametrize("role", keys.ONLINE_KEY_ROLES)
def test_rotating_an_online_key_publishes_a_root_trusting_only_the_new_key(
    env: Env, role: KeyRole
) -> None:
    image, director, online = env.image, env.director, env.online
    repo = image if role.repo == "image" else director
    old = Metadata[Root].from_bytes(repo.roots.read(1))
    [new_keyid] = env.rotate(role)

    new = Metadata[Root].from_bytes(repo.roots.read(2))
    assert new.signed.roles[role.tuf_role].keyids == [new_keyid]
    assert new_keyid not in old.signed.keys
    old.verify_delegate("root", new)  # the device's step 1 → 2
    loaded = keys.load_online_signers(online, role.repo)
    assert loaded.for_role(role.tuf_role).public_key.keyid == new_keyid
    assert not list(online.glob("*.next.pem"))
    other = director if repo is image else image
    assert other.roots.current().signed.version == 1  # the other repository is untouched


def test_rotating_root_is_signed_by_old_and_new_keys(env: Env) -> None:
    image, director, offline = env.image, env.director, env.offline
    old_files = {p.name for p in offline.glob("root-*.pem")}
    new_ids = env.rotate(KeyRole.ROOT, new_root_count=5, new_root_threshold=3)
    assert len(new_ids) == 5
    assert {p.name for p in (offline / "retired").iterdir()} == old_files
    assert len(list(offline.glob("root-*.pem"))) == 5
    for repo in (image, director):
        v1, v2 = (Metadata[Root].from_bytes(repo.roots.read(v)) for v in (1, 2))
        assert v2.signed.roles["root"].threshold == 3
        assert set(v2.signed.roles["root"].keyids) == set(new_ids)
        v1.verify_delegate("root", v2)
        v2.verify_delegate("root", v2)
    # the retired keys alone can no longer sign a root
    retired = keys.load_root_signers(offline / "retired")
    with pytest.raises(SigningError):
        image.renew_root(retired)
    image.renew_root(keys.load_root_signers(offline))
    assert image.roots.current().signed.version == 3


def test_an_interrupted_rotation_keeps_a_key_the_root_already_trusts(env: Env) -> None:
    image, offline, online = env.image, env.offline, env.online
    # the crash: the staged key was published in a root, but never moved into place
    staged = online / "image-snapshot.next.pem"
    keys._write_key(staged, Ed25519PrivateKey.generate())
    signer = keys._load_key(staged)
    image.rotate_online_key("snapshot", signer, keys.load_root_signers(offline))
    env.rotate(KeyRole.IMAGE_SNAPSHOT)
    assert image.roots.current().signed.version == 3
    assert keys.load_online_signers(online, "image").snapshot.public_key.keyid in (
        image.roots.current().signed.roles["snapshot"].keyids
    )


def test_rotation_without_enough_root_keys_changes_nothing(env: Env) -> None:
    image, offline, online = env.image, env.offline, env.online
    for path in sorted(offline.glob("root-*.pem"))[1:]:  # only one of three keys at hand
        path.rename(offline.parent / path.name)
    before = (online / "image-targets.pem").read_bytes()
    with pytest.raises(SigningError):
        env.rotate(KeyRole.IMAGE_TARGETS)
    assert (online / "image-targets.pem").read_bytes() == before
    assert not list(online.glob("*.next.pem"))
    assert image.roots.current().signed.version == 1
