"""The image repository, the director and their storage: versions, expiries, validation.

Signatures are checked with python-tuf's own Metadata API against the repository's root.
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from securesystemslib.signer._crypto_signer import CryptoSigner
from tuf.api._payload import Root, Snapshot, Targets, Timestamp
from tuf.api.metadata import Metadata

from agent.updater.targets import DirectorTargetCustom, ImageTargetCustom
from fleet_server.errors import Conflict, ValidationError
from fleet_server.tuf import (
    Assignment,
    Director,
    DirectorConfig,
    ImageRepository,
    LocalFolderStore,
    MemoryStore,
    MetadataNotFound,
    RoleSigners,
    SigningError,
    TargetInvalid,
    TargetNameInvalid,
)
from fleet_server.tuf.signing import issued_at

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DATA = b"model" * 100
SHA = hashlib.sha256(DATA).hexdigest()


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def signers() -> RoleSigners:
    return RoleSigners(*(CryptoSigner.generate_ed25519() for _ in range(3)))


def custom(name: str = "vad", version: str = "1.0.0") -> ImageTargetCustom:
    return ImageTargetCustom(
        name=name,
        version=version,
        format="onnx",
        compatible_profiles=("rpi4",),
        manifest_digest="c" * 64,
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def roots() -> list[CryptoSigner]:
    return [CryptoSigner.generate_ed25519() for _ in range(3)]


@pytest.fixture
def image(tmp_path: Path, clock: Clock, roots: list[CryptoSigner]) -> ImageRepository:
    return ImageRepository.create(LocalFolderStore(tmp_path), roots, 2, signers(), clock=clock)


def load(repo: ImageRepository, name: str) -> Metadata[Any]:
    md: Metadata[Any] = Metadata.from_bytes(repo.read(name))
    root = Metadata[Root].from_bytes(repo.root_bytes())
    root.verify_delegate(md.signed.type, md)  # raises unless signed by the root's threshold
    return md


def versions(repo: ImageRepository) -> tuple[int, int, int]:
    ts = Metadata[Timestamp].from_bytes(repo.read("timestamp.json")).signed
    snap = Metadata[Snapshot].from_bytes(repo.read(f"{ts.snapshot_meta.version}.snapshot.json"))
    return ts.version, ts.snapshot_meta.version, snap.signed.meta["targets.json"].version


# --- storage -------------------------------------------------------------------------


def test_local_store_writes_atomically_and_refuses_unsafe_names(tmp_path: Path) -> None:
    store = LocalFolderStore(tmp_path)
    store.write("devices/d1/revision.json", b"1")
    store.write("devices/d1/revision.json", b"2")
    assert store.read("devices/d1/revision.json") == b"2"
    assert [p.name for p in (tmp_path / "devices/d1").iterdir()] == ["revision.json"]  # no temp
    with pytest.raises(MetadataNotFound):
        store.read("timestamp.json")
    for name in ("../x.json", "/etc/passwd", "a/../../b", ".hidden", "a//b", "a\\b", ""):
        with pytest.raises(ValueError, match="unsafe store name"):
            store.write(name, b"x")
    store.delete("devices/d1/revision.json")
    store.delete("devices/d1/revision.json")  # twice is fine


def test_local_store_sees_a_file_another_process_replaced_at_once(tmp_path: Path) -> None:
    """Reads are served from memory while the file is unchanged; a replacement by
    another writer (a replica, the CLI) is read at the next call."""
    reader, writer = LocalFolderStore(tmp_path), LocalFolderStore(tmp_path)
    writer.write("timestamp.json", b"v1")
    assert reader.read("timestamp.json") == b"v1"
    assert reader.read("timestamp.json") is reader.read("timestamp.json")  # from memory
    writer.write("timestamp.json", b"v2")  # same size, same second
    assert reader.read("timestamp.json") == b"v2"
    writer.delete("timestamp.json")
    with pytest.raises(MetadataNotFound):
        reader.read("timestamp.json")


# --- the image repository ----------------------------------------------------------


def test_new_repository_is_signed_with_configured_expiries(
    image: ImageRepository, tmp_path: Path
) -> None:
    root = load(image, "1.root.json").signed
    assert isinstance(root, Root)
    assert root.consistent_snapshot is True
    assert root.roles["root"].threshold == 2 and len(root.roles["root"].keyids) == 3
    assert root.expires == T0 + timedelta(days=365)
    assert issued_at(root) == T0
    assert load(image, "1.targets.json").signed.expires == T0 + timedelta(days=90)
    assert load(image, "1.snapshot.json").signed.expires == T0 + timedelta(days=7)
    timestamp = load(image, "timestamp.json").signed
    assert timestamp.expires == T0 + timedelta(days=1)
    assert issued_at(timestamp) == T0
    assert versions(image) == (1, 1, 1)
    with pytest.raises(Conflict):
        ImageRepository.create(LocalFolderStore(tmp_path), [], 1, signers())


def test_add_target_bumps_targets_snapshot_and_timestamp(image: ImageRepository) -> None:
    path = "models/vad/1.0.0/int8-cpu/model.onnx"
    target = image.add_target(path, len(DATA), {"sha256": SHA}, custom())
    assert versions(image) == (2, 2, 2)
    signed = load(image, "2.targets.json").signed
    assert isinstance(signed, Targets)
    listed = signed.targets[path]
    assert (listed.length, listed.hashes) == (len(DATA), {"sha256": SHA})
    assert listed.custom == {
        "name": "vad",
        "version": "1.0.0",
        "format": "onnx",
        "compatible_profiles": ["rpi4"],
        "manifest_digest": "c" * 64,
    }
    assert image.get_target(path) == target
    listed.verify_length_and_hashes(DATA)

    assert image.add_target(path, len(DATA), {"sha256": SHA}, custom()) == target  # idempotent
    assert versions(image) == (2, 2, 2)
    with pytest.raises(Conflict):
        image.add_target(path, 5, {"sha256": "0" * 64}, custom())
    assert image.remove_target(path) is True
    assert image.remove_target(path) is False
    assert versions(image) == (3, 3, 3)
    assert image.get_target(path) is None


@pytest.mark.parametrize(
    "path",
    [
        "../../etc/passwd",
        "/models/vad/1.0.0/int8-cpu/model.onnx",
        "models/vad/../../../etc/passwd",
        "models/vad/1.0.0/int8-cpu/../../x",
        "models/vad/1.0.0/int8-cpu/.bashrc",
        "models/vad/1.0.0/int8-cpu/a\\b",
        "models/vad/1.0.0/int8 cpu/model.onnx",
        "models/vad/1.0.0/int8-cpu/mödel.onnx",
        "models/vad/1.0.0/int8-cpu//model.onnx",
        "models/vad/1.0.0/model.onnx",
        "weights/vad/1.0.0/int8-cpu/model.onnx",
        "models/vad/1.0.0/int8-cpu/" + "x" * 600,
    ],
)
def test_unsafe_or_misplaced_target_names_are_refused(image: ImageRepository, path: str) -> None:
    with pytest.raises(TargetNameInvalid):
        image.add_target(path, 1, {"sha256": SHA}, custom())
    assert versions(image) == (1, 1, 1)


def test_targets_with_bad_hashes_or_custom_fields_are_refused(image: ImageRepository) -> None:
    path = "models/vad/1.0.0/int8-cpu/model.onnx"
    for hashes in ({}, {"md5": "0" * 32}, {"sha256": "XYZ"}, {"sha256": SHA, "sha1": "0" * 40}):
        with pytest.raises(TargetInvalid):
            image.add_target(path, 1, hashes, custom())
    with pytest.raises(TargetInvalid, match="do not match"):
        image.add_target(path, 1, {"sha256": SHA}, custom(version="2.0.0"))


def test_refresh_resigns_each_role_at_half_its_lifetime(
    image: ImageRepository, clock: Clock
) -> None:
    assert image.refresh().resigned == ()
    clock.now = T0 + timedelta(hours=13)
    assert image.refresh().resigned == ("timestamp",)
    assert versions(image) == (2, 1, 1)
    clock.now = T0 + timedelta(days=4)
    assert image.refresh().resigned == ("snapshot", "timestamp")
    assert versions(image) == (3, 2, 1)
    clock.now = T0 + timedelta(days=46)
    result = image.refresh()
    assert result.resigned == ("targets", "snapshot", "timestamp")
    assert result.root_expires == T0 + timedelta(days=365)
    assert versions(image) == (4, 3, 2)
    assert load(image, "2.targets.json").signed.expires == clock.now + timedelta(days=90)


def test_old_versions_are_pruned_but_recent_ones_stay_servable(image: ImageRepository) -> None:
    for v in range(5):
        image.add_target(f"models/m/{v}.0/cpu/f.onnx", 1, {"sha256": SHA}, custom("m", f"{v}.0"))
    assert versions(image) == (6, 6, 6)
    for role in ("snapshot", "targets"):
        for version in (1, 2, 3):
            with pytest.raises(MetadataNotFound):
                image.read(f"{version}.{role}.json")
        for version in (4, 5, 6):
            load(image, f"{version}.{role}.json")


def test_only_metadata_names_are_served(image: ImageRepository) -> None:
    for name in ("../root.json", "keys.json", "1.root.json.bak", "0.root.json", "root"):
        with pytest.raises(MetadataNotFound):
            image.read(name)


def test_root_without_the_old_threshold_is_not_published(
    image: ImageRepository, roots: list[CryptoSigner]
) -> None:
    new = [CryptoSigner.generate_ed25519() for _ in range(2)]
    with pytest.raises(SigningError, match="1/2 signatures of the previous root"):
        image.rotate_root(roots[:1], new, 2)
    with pytest.raises(SigningError):
        image.rotate_online_key("timestamp", CryptoSigner.generate_ed25519(), roots[:1])
    assert image.roots.current().signed.version == 1
    image.rotate_root(roots[1:], new, 2)
    root_v2 = Metadata[Root].from_bytes(image.roots.read(2))
    root_v1 = Metadata[Root].from_bytes(image.roots.read(1))
    root_v1.verify_delegate("root", root_v2)
    root_v2.verify_delegate("root", root_v2)
    assert versions(image) == (2, 2, 2)  # everything re-signed after the rotation


# --- the director ------------------------------------------------------------------


@pytest.fixture
def director(clock: Clock, roots: list[CryptoSigner]) -> Director:
    return Director.create(MemoryStore(), roots, 2, signers(), clock=clock)


def assignment(version: str = "1.0.0", profile: str = "rpi4") -> Assignment:
    return Assignment(
        path=f"models/vad/{version}/int8-cpu/model.onnx",
        length=len(DATA),
        hashes={"sha256": SHA},
        name="vad",
        version=version,
        variant="int8-cpu",
        profile=profile,
        rollout_id="r-7",
    )


def test_director_lists_exactly_the_assignments_for_the_device(director: Director) -> None:
    md = director.metadata_for("dev-1", [assignment()])
    root = Metadata[Root].from_bytes(md.root)
    targets = Metadata[Targets].from_bytes(md.targets)
    root.verify_delegate("targets", targets)
    [(path, target)] = targets.signed.targets.items()
    assert path == "models/vad/1.0.0/int8-cpu/model.onnx"
    assert DirectorTargetCustom.model_validate(target.custom) == DirectorTargetCustom(
        device_id="dev-1",
        rollout_id="r-7",
        name="vad",
        version="1.0.0",
        variant="int8-cpu",
        profile="rpi4",
    )
    timestamp = Metadata[Timestamp].from_bytes(md.timestamp)
    root.verify_delegate("timestamp", timestamp)
    assert timestamp.signed.snapshot_meta.version == md.targets_version
    assert T0 <= timestamp.signed.expires <= T0 + timedelta(hours=1)
    assert set(md.files) == {
        "1.root.json",
        "root.json",
        "timestamp.json",
        f"{md.targets_version}.snapshot.json",
        f"{md.targets_version}.targets.json",
    }


def test_director_versions_increase_exactly_when_inputs_change(
    director: Director, clock: Clock
) -> None:
    first = director.metadata_for("dev-1", [assignment()])
    assert director.metadata_for("dev-1", [assignment()]) == first  # deterministic bytes
    changed = director.metadata_for("dev-1", [assignment("1.1.0")])
    assert changed.revision == first.revision + 1
    assert changed.targets_version > first.targets_version
    assert changed.timestamp_version > first.timestamp_version
    back = director.metadata_for("dev-1", [assignment()])  # back to the old set: still newer
    assert back.targets_version > changed.targets_version

    clock.now += timedelta(minutes=31)  # a new timestamp epoch only
    later = director.metadata_for("dev-1", [assignment()])
    assert later.targets == back.targets and later.timestamp_version > back.timestamp_version
    clock.now += timedelta(hours=12)  # a new targets/snapshot epoch
    much_later = director.metadata_for("dev-1", [assignment()])
    assert much_later.targets_version > later.targets_version
    # the database's revision can drive versions instead of the director's own counter
    assert director.metadata_for("dev-2", [], revision=5).revision == 5
    with pytest.raises(ValidationError):
        director.metadata_for("dev-2", [], revision=-1)


def test_director_keeps_built_files_for_the_timestamp_that_names_them(
    clock: Clock, roots: list[CryptoSigner]
) -> None:
    store, keys = MemoryStore(), signers()
    director = Director.create(store, roots, 2, keys, clock=clock)
    md = director.metadata_for("dev-1", [assignment()], revision=3)
    v = md.targets_version
    assert director.cached("dev-1", f"{v}.targets.json") == md.targets
    assert director.cached("dev-1", f"{v}.snapshot.json") == md.snapshot
    for device, name in [
        ("dev-2", f"{v}.targets.json"),  # another device's version
        ("dev-1", f"{v + 1}.targets.json"),
        ("dev-1", "timestamp.json"),  # always built from the database
        ("dev-1", "1.root.json"),
    ]:
        assert director.cached(device, name) is None
    # Another replica builds the same bytes (deterministic signatures).
    assert (
        Director(store, keys, clock=clock).metadata_for("dev-1", [assignment()], revision=3) == md
    )
    # Changed assignments under the same revision (not what the server does) are rebuilt.
    other = director.metadata_for("dev-1", [assignment("1.1.0")], revision=3)
    assert other.targets != md.targets
    assert director.cached("dev-1", f"{v}.targets.json") == other.targets
    # No cache when configured so.
    off = Director(store, keys, DirectorConfig(cache_ttl_s=0), clock=clock)
    off.metadata_for("dev-1", [assignment()], revision=3)
    assert off.cached("dev-1", f"{v}.targets.json") is None


def test_director_serves_the_previous_epoch_for_slow_clients(
    director: Director, clock: Clock
) -> None:
    md = director.metadata_for("dev-1", [assignment()])
    name = f"{md.targets_version}.snapshot.json"
    assert director.serve("dev-1", name, [assignment()]) == md.snapshot
    clock.now += timedelta(hours=12)  # the epoch turns between timestamp and snapshot fetch
    assert director.serve("dev-1", name, [assignment()]) == md.snapshot
    clock.now += timedelta(hours=12)
    with pytest.raises(MetadataNotFound):
        director.serve("dev-1", name, [assignment()])
    for bad in ("../root.json", "1.keys.json", "x.targets.json"):
        with pytest.raises(MetadataNotFound):
            director.serve("dev-1", bad, [])
    assert director.serve("dev-1", "1.root.json", []) == director.root_bytes()


def test_director_refuses_bad_device_ids_and_assignments(director: Director) -> None:
    for device in ("..", ".", "a/b", "", "x" * 65, "dev 1"):
        with pytest.raises(ValidationError, match="invalid device id"):
            director.metadata_for(device, [])
    with pytest.raises(Conflict):
        director.metadata_for("dev-1", [assignment(), assignment()])
    with pytest.raises(ValueError, match="not models/name/version/variant/file"):
        Assignment(
            path="models/../../etc/passwd",
            length=1,
            hashes={"sha256": SHA},
            name="vad",
            version="1",
            variant="x",
            profile="rpi4",
        )
    evil = assignment().model_copy(update={"path": "models/../../../../etc/passwd"})
    with pytest.raises(TargetNameInvalid):
        director.metadata_for("dev-1", [evil])


def test_director_short_lifetimes_are_configurable(roots: list[CryptoSigner], clock: Clock) -> None:
    config = DirectorConfig(
        timestamp_expiry=timedelta(minutes=10), targets_expiry=timedelta(hours=2)
    )
    director = Director.create(MemoryStore(), roots, 2, signers(), config=config, clock=clock)
    md = director.metadata_for("dev-1", [assignment()])
    assert Metadata[Timestamp].from_bytes(md.timestamp).signed.expires <= T0 + timedelta(minutes=10)
    assert Metadata[Targets].from_bytes(md.targets).signed.expires <= T0 + timedelta(hours=2)
    with pytest.raises(ValueError, match="extra"):
        DirectorConfig.model_validate({"timestamp_expiry": 60, "typo": 1})


def test_director_revision_counter_is_persisted(tmp_path: Path, roots: list[CryptoSigner]) -> None:
    store = LocalFolderStore(tmp_path)
    director = Director.create(store, roots, 2, signers())
    director.metadata_for("dev-1", [assignment()])
    director.metadata_for("dev-1", [assignment("2.0.0")])
    state = json.loads(store.read("devices/dev-1/revision.json"))
    assert state["revision"] == 2
    again = Director(store, signers())  # e.g. after a restart
    assert again.metadata_for("dev-1", [assignment("2.0.0")]).revision == 2
