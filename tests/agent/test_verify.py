"""The device side of OTA verification, against a real image repository and director.

Real python-tuf (ngclient on the device, the Metadata API on the server), real ed25519
keys; the only stand-in is the fetcher, which serves the server's metadata in-process
the way the HTTP routes will (and lets a test play the attacker).
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer._crypto_signer import CryptoSigner
from tuf.api._payload import MetaFile, Snapshot, TargetFile, Targets, Timestamp
from tuf.api.exceptions import DownloadHTTPError
from tuf.api.metadata import Metadata
from tuf.ngclient.fetcher import FetcherInterface

from agent.errors import (
    BadSignature,
    ClockUnsynced,
    DirectorImageMismatch,
    MetadataExpired,
    MetadataUnavailable,
    RollbackAttack,
    TargetMismatch,
    TargetPathInvalid,
    ThresholdNotMet,
    WrongDevice,
    WrongProfile,
)
from agent.updater.targets import ImageTargetCustom, parse_model_target
from agent.updater.verify import UpdateVerifier
from fleet_server import keys
from fleet_server.tuf import (
    Assignment,
    Director,
    ImageRepository,
    LocalFolderStore,
    MetadataNotFound,
    RoleSigners,
)
from fleet_server.tuf.signing import sign, to_bytes

BASE = "https://fleet.test"
MODEL = b"\x08\x07onnx model bytes" * 10
PATH = "models/vad/1.2.0/int8-cpu/model.onnx"


class FleetServer(FetcherInterface):
    """Serves ``/tuf/image/...`` and ``/tuf/director/{device}/...`` like the API will."""

    def __init__(self, image: ImageRepository, director: Director) -> None:
        self.image = image
        self.director = director
        self.assignments: dict[str, list[Assignment]] = {}
        self.overrides: dict[str, bytes] = {}  # an attacker's answers, by path
        self.alias: dict[str, str] = {}  # serve one device's director metadata as another's
        self.down = False

    def _fetch(self, url: str) -> Iterator[bytes]:
        if self.down:
            raise ConnectionRefusedError("connection refused")
        path = url.removeprefix(f"{BASE}/tuf/")
        if path in self.overrides:
            return iter([self.overrides[path]])
        try:
            if path.startswith("image/"):
                return iter([self.image.read(path.removeprefix("image/"))])
            device, name = path.removeprefix("director/").split("/", 1)
            device = self.alias.get(device, device)
            return iter([self.director.serve(device, name, self.assignments.get(device, []))])
        except (MetadataNotFound, ValueError):
            raise DownloadHTTPError(f"{url} not found", 404) from None


@dataclass
class ServerClock:
    """The server's clock: real time plus an offset a test can move."""

    offset: timedelta = timedelta(0)

    def __call__(self) -> datetime:
        return datetime.now(UTC).replace(microsecond=0) + self.offset


@dataclass
class Fleet:
    tmp: Path
    image: ImageRepository
    director: Director
    server: FleetServer
    image_clock: ServerClock
    director_clock: ServerClock
    image_root_v1: bytes = field(default=b"")
    director_root_v1: bytes = field(default=b"")

    def verifier(self, name: str = "device", **kwargs: object) -> UpdateVerifier:
        return UpdateVerifier(
            BASE,
            self.tmp / name,
            self.image_root_v1,
            self.director_root_v1,
            fetcher=self.server,
            **kwargs,  # type: ignore[arg-type]
        )

    def rotate(self, role: keys.KeyRole, **root: int) -> None:
        keys.rotate_role(
            role,
            offline_dir=self.tmp / "offline",
            online_dir=self.tmp / "online",
            image=self.image,
            director=self.director,
            **root,  # type: ignore[arg-type]
        )

    def add_model(
        self, path: str = PATH, data: bytes = MODEL, profiles: tuple[str, ...] = ("rpi4", "x86")
    ) -> TargetFile:
        parts = parse_model_target(path)
        assert parts is not None
        custom = ImageTargetCustom(
            name=parts.name,
            version=parts.version,
            format="onnx",
            compatible_profiles=profiles,
            manifest_digest="sha256:" + "ab" * 32,
            min_agent_version="0.1.0",
        )
        sha = hashlib.sha256(data).hexdigest()
        return self.image.add_target(path, len(data), {"sha256": sha}, custom)

    def assign(self, device: str, target: TargetFile, profile: str = "rpi4") -> None:
        assignment = Assignment.for_target(target, profile=profile, rollout_id="r-1")
        self.server.assignments[device] = [assignment]


@pytest.fixture
def fleet(tmp_path: Path) -> Fleet:
    tmp = tmp_path
    keys.init_keys(tmp / "offline", tmp / "online", root_threshold=2, root_count=3)
    roots = keys.load_root_signers(tmp / "offline")
    image_clock, director_clock = ServerClock(), ServerClock()
    image = ImageRepository.create(
        LocalFolderStore(tmp / "image"),
        roots,
        2,
        keys.load_online_signers(tmp / "online", "image"),
        clock=image_clock,
    )
    director = Director.create(
        LocalFolderStore(tmp / "director"),
        roots,
        2,
        keys.load_online_signers(tmp / "online", "director"),
        clock=director_clock,
    )
    fleet = Fleet(tmp, image, director, FleetServer(image, director), image_clock, director_clock)
    fleet.image_root_v1 = image.root_bytes()
    fleet.director_root_v1 = director.root_bytes()
    return fleet


# --- the happy path ----------------------------------------------------------------


def test_verified_assignment_names_the_artifact_and_its_purpose(fleet: Fleet) -> None:
    fleet.assign("dev-1", fleet.add_model())
    fleet.add_model("models/ocr/2.0.0/fp16-gpu/det.onnx", b"other")  # in the repo, not assigned

    [target] = fleet.verifier().verify_assignments("dev-1", "rpi4")

    assert target.path == PATH
    assert target.length == len(MODEL)
    assert target.hashes == {"sha256": hashlib.sha256(MODEL).hexdigest()}
    assert (target.director.device_id, target.director.profile) == ("dev-1", "rpi4")
    assert (target.director.variant, target.director.rollout_id) == ("int8-cpu", "r-1")
    assert target.image.compatible_profiles == ("rpi4", "x86")
    assert target.image.min_agent_version == "0.1.0"
    target.verify(MODEL)
    with pytest.raises(TargetMismatch):
        target.verify(MODEL[:-1] + b"X")


def test_second_poll_uses_cached_metadata_and_sees_new_assignments(fleet: Fleet) -> None:
    verifier = fleet.verifier()
    assert verifier.verify_assignments("dev-1", "rpi4") == []
    fleet.assign("dev-1", fleet.add_model())
    assert [t.path for t in verifier.verify_assignments("dev-1", "rpi4")] == [PATH]
    fleet.server.assignments["dev-1"] = []
    assert verifier.verify_assignments("dev-1", "rpi4") == []


def test_unreachable_server_is_reported_as_such(fleet: Fleet) -> None:
    fleet.server.down = True
    with pytest.raises(MetadataUnavailable):
        fleet.verifier().verify_assignments("dev-1", "rpi4")


# --- rollback, freeze, bad keys ----------------------------------------------------


def test_replayed_director_timestamp_is_a_rollback(fleet: Fleet) -> None:
    verifier = fleet.verifier()
    fleet.assign("dev-1", fleet.add_model())
    old = fleet.server.director.serve("dev-1", "timestamp.json", fleet.server.assignments["dev-1"])
    verifier.verify_assignments("dev-1", "rpi4")
    fleet.server.assignments["dev-1"] = []  # the operator withdraws the model
    assert verifier.verify_assignments("dev-1", "rpi4") == []

    fleet.server.overrides["director/dev-1/timestamp.json"] = old  # ...and an attacker replays
    with pytest.raises(RollbackAttack):
        verifier.verify_assignments("dev-1", "rpi4")


def test_replayed_image_timestamp_is_a_rollback(fleet: Fleet) -> None:
    verifier = fleet.verifier()
    old = fleet.image.read("timestamp.json")
    fleet.assign("dev-1", fleet.add_model())
    verifier.verify_assignments("dev-1", "rpi4")

    fleet.server.overrides["image/timestamp.json"] = old
    with pytest.raises(RollbackAttack):
        verifier.verify_assignments("dev-1", "rpi4")


def test_expired_image_metadata_is_refused(fleet: Fleet) -> None:
    fleet.image_clock.offset = -timedelta(days=2)  # the image timestamp lives 1 day
    fleet.add_model()
    with pytest.raises(MetadataExpired, match=r"image repository: timestamp.json is expired"):
        fleet.verifier().verify_assignments("dev-1", "rpi4")


def test_expired_director_metadata_is_refused(fleet: Fleet) -> None:
    fleet.director_clock.offset = -timedelta(hours=3)  # the director timestamp lives 1 hour
    with pytest.raises(MetadataExpired, match=r"director: timestamp.json is expired"):
        fleet.verifier().verify_assignments("dev-1", "rpi4")


def test_metadata_signed_by_the_wrong_key_is_refused(fleet: Fleet) -> None:
    rogue = CryptoSigner.generate_ed25519()
    forged = ImageRepository(
        LocalFolderStore(fleet.tmp / "image"), RoleSigners(rogue, rogue, rogue)
    )
    forged.add_target(
        "models/evil/6.6.6/int8-cpu/model.onnx",
        3,
        {"sha256": "0" * 64},
        ImageTargetCustom(
            name="evil",
            version="6.6.6",
            format="onnx",
            compatible_profiles=("rpi4",),
            manifest_digest="0" * 64,
        ),
    )
    with pytest.raises(BadSignature, match="timestamp was signed by 0/1"):
        fleet.verifier().verify_assignments("dev-1", "rpi4")


def test_root_rotation_below_the_old_threshold_is_refused(fleet: Fleet) -> None:
    verifier = fleet.verifier()
    verifier.verify_assignments("dev-1", "rpi4")
    old_roots = keys.load_root_signers(fleet.tmp / "offline")
    new_root = CryptoSigner.generate_ed25519()
    # root v2 hands the root role to an attacker's key, signed by ONE stolen old root key
    md = Metadata.from_bytes(fleet.image.roots.read(1))
    root = md.signed
    root.version = 2
    for keyid in list(root.roles["root"].keyids):
        root.revoke_key(keyid, "root")
    root.add_key(new_root.public_key, "root")
    root.roles["root"].threshold = 1
    forged = to_bytes(sign(root, [old_roots[0], new_root]))
    fleet.server.overrides["image/2.root.json"] = forged

    with pytest.raises(ThresholdNotMet, match="root was signed by 1/2"):
        verifier.verify_assignments("dev-1", "rpi4")


# --- Uptane: director and image repository must agree ------------------------------


def test_director_metadata_for_another_device_is_refused(fleet: Fleet) -> None:
    fleet.assign("dev-2", fleet.add_model())
    fleet.server.alias["dev-1"] = "dev-2"  # dev-2's (validly signed) metadata served to dev-1
    with pytest.raises(WrongDevice, match="assigned to dev-2"):
        fleet.verifier().verify_assignments("dev-1", "rpi4")


def test_variant_for_another_profile_is_refused(fleet: Fleet) -> None:
    fleet.assign("dev-1", fleet.add_model(), profile="jetson-orin")
    with pytest.raises(WrongProfile, match="jetson-orin"):
        fleet.verifier().verify_assignments("dev-1", "rpi4")


def test_variant_the_image_repo_does_not_build_for_this_profile_is_refused(fleet: Fleet) -> None:
    fleet.assign("dev-1", fleet.add_model(profiles=("jetson-orin",)), profile="rpi4")
    with pytest.raises(WrongProfile, match="not built for profile rpi4"):
        fleet.verifier().verify_assignments("dev-1", "rpi4")


def test_compromised_director_naming_another_hash_is_refused(fleet: Fleet) -> None:
    target = fleet.add_model()
    evil = Assignment.for_target(target, profile="rpi4").model_copy(
        update={"hashes": {"sha256": hashlib.sha256(b"malware").hexdigest()}, "length": 7}
    )
    fleet.server.assignments["dev-1"] = [evil]
    with pytest.raises(DirectorImageMismatch, match="disagree"):
        fleet.verifier().verify_assignments("dev-1", "rpi4")


def test_director_naming_a_target_the_image_repo_lacks_is_refused(fleet: Fleet) -> None:
    ghost = TargetFile(5, {"sha256": "1" * 64}, "models/vad/9.9.9/int8-cpu/model.onnx")
    fleet.server.assignments["dev-1"] = [Assignment.for_target(ghost, profile="rpi4")]
    with pytest.raises(DirectorImageMismatch, match="does not list"):
        fleet.verifier().verify_assignments("dev-1", "rpi4")


def test_path_traversal_from_a_compromised_director_is_refused(fleet: Fleet) -> None:
    # The attacker holds the director's online keys and signs a traversal path.
    signers = keys.load_online_signers(fleet.tmp / "online", "director")
    expires = datetime.now(UTC) + timedelta(hours=1)
    evil_path = "models/../../../etc/cron.d/evil"
    custom = {
        "device_id": "dev-1",
        "name": "vad",
        "version": "1",
        "variant": "x",
        "profile": "rpi4",
    }
    targets = Targets(version=7, expires=expires)
    targets.targets[evil_path] = TargetFile(3, {"sha256": "2" * 64}, evil_path, {"custom": custom})
    snapshot = Snapshot(version=7, expires=expires, meta={"targets.json": MetaFile(7)})
    timestamp = Timestamp(version=7, expires=expires, snapshot_meta=MetaFile(7))
    fleet.server.overrides |= {
        "director/dev-1/timestamp.json": to_bytes(sign(timestamp, [signers.timestamp])),
        "director/dev-1/7.snapshot.json": to_bytes(sign(snapshot, [signers.snapshot])),
        "director/dev-1/7.targets.json": to_bytes(sign(targets, [signers.targets])),
    }
    with pytest.raises(TargetPathInvalid, match="unsafe target path"):
        fleet.verifier().verify_assignments("dev-1", "rpi4")


# --- rotation and clocks -------------------------------------------------------------


def test_device_offline_across_root_and_key_rotations_walks_the_chain(fleet: Fleet) -> None:
    fleet.assign("dev-1", fleet.add_model())
    early = fleet.verifier("early")
    early.verify_assignments("dev-1", "rpi4")
    fleet.rotate(keys.KeyRole.ROOT)
    fleet.rotate(keys.KeyRole.IMAGE_TIMESTAMP)
    fleet.rotate(keys.KeyRole.ROOT, new_root_count=4, new_root_threshold=3)
    fleet.rotate(keys.KeyRole.DIRECTOR_TARGETS)
    fleet.rotate(keys.KeyRole.IMAGE_TARGETS)
    assert fleet.image.roots.current().signed.version == 5
    assert fleet.director.roots.current().signed.version == 4

    # the device that was offline, and one enrolled long ago with only the v1 roots
    for verifier in (early, fleet.verifier("late")):
        [target] = verifier.verify_assignments("dev-1", "rpi4")
        assert target.path == PATH
    history = sorted(p.name for p in (fleet.tmp / "late/tuf/image/root_history").iterdir())
    assert history == [f"{v}.root.json" for v in range(1, 6)]


def test_clock_before_the_root_was_issued_is_unsynced(fleet: Fleet) -> None:
    root_issued = datetime.now(UTC)
    verifier = fleet.verifier(clock=lambda: root_issued - timedelta(days=1))
    with pytest.raises(ClockUnsynced, match="trusted metadata was issued"):
        verifier.verify_assignments("dev-1", "rpi4")


def test_clock_before_a_known_good_time_is_unsynced(fleet: Fleet) -> None:
    fleet.image_clock.offset = timedelta(hours=2)  # the image timestamp is issued at +2 h
    fleet.add_model()
    now = datetime.now(UTC)
    fleet.verifier(clock=lambda: now + timedelta(hours=2)).verify_assignments("dev-1", "rpi4")
    for cache in ("image", "director"):  # even without cached metadata, the device remembers
        shutil.rmtree(fleet.tmp / "device/tuf" / cache)

    with pytest.raises(ClockUnsynced, match="trusted metadata was issued"):
        fleet.verifier(clock=lambda: now + timedelta(hours=1)).verify_assignments("dev-1", "rpi4")
    within_skew = fleet.verifier(clock=lambda: now + timedelta(hours=2) - timedelta(minutes=2))
    assert within_skew.verify_assignments("dev-1", "rpi4") == []
