"""The device side of OTA verification (Uptane): the image repository and the director agree.

Two python-tuf ``ngclient.Updater`` instances, one per repository, each with its own trusted
root (given at enrolment) and metadata folder in the agent's state dir::

    {state}/tuf/image/                 ← {server}/tuf/image/
    {state}/tuf/director/{device}/     ← {server}/tuf/director/{device}/
    {state}/tuf/known_good_time        the newest issue time this device has verified

python-tuf does all signature, threshold, version and expiry checks. On top of them
:meth:`UpdateVerifier.verify_assignments` checks what only Uptane knows: the director's
targets name this device and its profile, and the image repository lists the *same* path
with the same length and hashes. Every refusal is an :class:`~agent.errors.UpdateError`
with its own code; nothing is returned unless everything verified.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import pydantic
from tuf.api import exceptions as tuf_errors

# Imported from the defining modules: tuf.ngclient's __all__ is computed, and
# tuf.api.metadata re-exports TargetFile only implicitly; mypy --strict accepts neither.
from tuf.api._payload import TargetFile
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.updater import Updater

from agent.errors import (
    BadSignature,
    ClockUnsynced,
    DirectorImageMismatch,
    MetadataExpired,
    MetadataInvalid,
    MetadataUnavailable,
    RollbackAttack,
    TargetMismatch,
    TargetPathInvalid,
    ThresholdNotMet,
    UpdateError,
    WrongDevice,
    WrongProfile,
)
from agent.updater.targets import (
    ISSUED_FIELD,
    DirectorTargetCustom,
    ImageTargetCustom,
    is_safe_device_id,
    parse_model_target,
)

_SIGNED_BY_RE = re.compile(r"signed by (\d+)/(\d+) keys")


def _utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class VerifiedTarget:
    """An artifact this device must run, verified by both repositories."""

    target: TargetFile
    image: ImageTargetCustom
    director: DirectorTargetCustom

    @property
    def path(self) -> str:
        """The target path, ``models/{name}/{version}/{variant}/{file}``."""
        return self.target.path

    @property
    def length(self) -> int:
        return self.target.length

    @property
    def hashes(self) -> dict[str, str]:
        return dict(self.target.hashes)

    def verify(self, data: bytes | IO[bytes]) -> None:
        """Check downloaded ``data`` (bytes or a binary file) against the signed length and hashes.

        Raises:
            TargetMismatch: the length or a hash differs.
        """
        try:
            self.target.verify_length_and_hashes(data)
        except tuf_errors.LengthOrHashMismatchError as e:
            raise TargetMismatch(f"{self.path}: {e}") from None


@contextlib.contextmanager
def _refusals(repo: str) -> Iterator[None]:
    """Turn python-tuf's exceptions into update errors, each with its own code."""
    try:
        yield
    except tuf_errors.ExpiredMetadataError as e:
        raise MetadataExpired(f"{repo}: {e}") from None
    except tuf_errors.BadVersionNumberError as e:
        raise RollbackAttack(f"{repo}: {e}") from None
    except tuf_errors.UnsignedMetadataError as e:
        match = _SIGNED_BY_RE.search(str(e))
        if match and int(match[1]) > 0:
            raise ThresholdNotMet(f"{repo}: {e}") from None
        raise BadSignature(f"{repo}: {e}") from None
    except (tuf_errors.RepositoryError, tuf_errors.DownloadLengthMismatchError) as e:
        raise MetadataInvalid(f"{repo}: {e}") from None
    except tuf_errors.DownloadError as e:
        cause = f" ({e.__cause__})" if e.__cause__ else ""
        raise MetadataUnavailable(f"{repo}: {e}{cause}") from None
    except OSError as e:
        raise UpdateError(f"{repo}: local metadata: {e.strerror or e}") from None


def _issued(metadata: bytes) -> datetime | None:
    """The signed issue time in trusted metadata (None when it has none)."""
    try:
        value = json.loads(metadata)["signed"][ISSUED_FIELD]
        return datetime.strptime(value, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    except (ValueError, TypeError, KeyError):
        return None


def _issued_in_file(path: Path) -> datetime | None:
    """The signed issue time in a metadata file that ngclient verified and stored."""
    try:
        return _issued(path.read_bytes())
    except OSError:
        return None


class UpdateVerifier:
    """Verifies a device's assignments against the director and the image repository."""

    def __init__(
        self,
        server_url: str,
        state_dir: Path,
        image_root: bytes,
        director_root: bytes,
        *,
        fetcher: FetcherInterface | None = None,
        clock: Callable[[], datetime] = _utc_now,
        max_clock_skew: timedelta = timedelta(minutes=5),
    ) -> None:
        """``image_root``/``director_root`` are the roots given at enrolment (trust anchors).

        ``fetcher`` replaces ngclient's urllib3 fetcher (tests, mTLS); ``clock`` is the
        clock checked against trusted issue times (python-tuf's expiry checks always use
        the system clock).
        """
        self._base = server_url.rstrip("/")
        self._dir = state_dir / "tuf"
        self._image_root = image_root
        self._director_root = director_root
        self._fetcher = fetcher
        self._clock = clock
        self._skew = max_clock_skew

    def verify_assignments(self, device_id: str, profile: str) -> list[VerifiedTarget]:
        """Refresh both repositories and return what the director assigns this device.

        Raises:
            ClockUnsynced: the clock is earlier than trusted metadata was issued.
            MetadataUnavailable: the server could not be reached.
            MetadataExpired, RollbackAttack, BadSignature, ThresholdNotMet,
            MetadataInvalid: python-tuf refused metadata of either repository.
            TargetPathInvalid: the director names an unsafe or badly laid out path.
            WrongDevice, WrongProfile: a director target for another device or profile.
            DirectorImageMismatch: the image repository lists the path differently or not.
            UpdateError: a bad device id, or the state dir cannot be written.
        """
        if not is_safe_device_id(device_id):
            raise UpdateError(f"invalid device id {device_id!r}")
        director_dir = self._dir / "director" / device_id
        image_dir = self._dir / "image"
        now = self._clock()
        self._check_clock(now, [director_dir / "root.json", image_dir / "root.json"])

        director = self._updater(
            "director", director_dir, f"tuf/director/{quote(device_id)}/", self._director_root
        )
        image = self._updater("image repository", image_dir, "tuf/image/", self._image_root)
        with _refusals("director"):
            director.refresh()
        with _refusals("image repository"):
            image.refresh()
        timestamps = [director_dir / "timestamp.json", image_dir / "timestamp.json"]
        self._check_clock(now, [director_dir / "root.json", image_dir / "root.json", *timestamps])

        verified = []
        for path in self._director_paths(director_dir):
            with _refusals("director"):
                assigned = director.get_targetinfo(path)
            if assigned is None:
                raise MetadataInvalid(f"director: target {path!r} vanished during verification")
            verified.append(self._check_target(device_id, profile, assigned, image))
        self._remember_good_time([t for t in map(_issued_in_file, timestamps) if t is not None])
        return verified

    def _updater(self, repo: str, folder: Path, url_path: str, root: bytes) -> Updater:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        with _refusals(repo):
            return Updater(
                str(folder), f"{self._base}/{url_path}", fetcher=self._fetcher, bootstrap=root
            )

    @staticmethod
    def _director_paths(director_dir: Path) -> list[str]:
        """The target paths of the director targets.json that ngclient just verified and stored.

        Each is looked up again through ngclient, so only verified data is used.
        """
        try:
            signed: dict[str, Any] = json.loads((director_dir / "targets.json").read_bytes())
            return sorted(signed["signed"]["targets"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MetadataInvalid(f"director: cannot read verified targets: {e}") from None

    @staticmethod
    def _check_target(
        device_id: str, profile: str, assigned: TargetFile, image: Updater
    ) -> VerifiedTarget:
        path = assigned.path
        parts = parse_model_target(path)
        if parts is None:
            raise TargetPathInvalid(f"director names an unsafe target path {path!r}")
        try:
            director = DirectorTargetCustom.model_validate(assigned.custom)
        except pydantic.ValidationError:
            raise MetadataInvalid(f"director: bad custom fields for {path}") from None
        if director.device_id != device_id:
            raise WrongDevice(f"{path} is assigned to {director.device_id}, not {device_id}")
        if director.profile != profile:
            raise WrongProfile(f"{path} is for profile {director.profile}, this is {profile}")
        if (director.name, director.version, director.variant) != parts[:3]:
            raise MetadataInvalid(f"director: name/version/variant disagree with {path}")

        with _refusals("image repository"):
            listed = image.get_targetinfo(path)
        if listed is None:
            raise DirectorImageMismatch(f"the image repository does not list {path}")
        if listed.length != assigned.length or listed.hashes != assigned.hashes:
            raise DirectorImageMismatch(f"director and image repository disagree on {path}")
        try:
            image_custom = ImageTargetCustom.model_validate(listed.custom)
        except pydantic.ValidationError:
            raise MetadataInvalid(f"image repository: bad custom fields for {path}") from None
        if profile not in image_custom.compatible_profiles:
            raise WrongProfile(f"{path} is not built for profile {profile}")
        if (image_custom.name, image_custom.version) != (director.name, director.version):
            raise DirectorImageMismatch(f"director and image repository name {path} differently")
        return VerifiedTarget(listed, image_custom, director)

    # --- the clock -----------------------------------------------------------------

    def _check_clock(self, now: datetime, trusted_files: list[Path]) -> None:
        """Refuse a clock earlier than any trusted issue time (minus the allowed skew)."""
        times = [_issued_in_file(p) for p in trusted_files]
        times += [_issued(self._image_root), _issued(self._director_root)]
        times.append(self._known_good_time())
        latest = max((t for t in times if t is not None), default=None)
        if latest is not None and now + self._skew < latest:
            raise ClockUnsynced(
                f"the clock says {now:%Y-%m-%dT%H:%M:%SZ}, but trusted metadata was issued "
                f"at {latest:%Y-%m-%dT%H:%M:%SZ}"
            )

    def _known_good_time(self) -> datetime | None:
        try:
            return datetime.fromisoformat((self._dir / "known_good_time").read_text().strip())
        except (OSError, ValueError):
            return None

    def _remember_good_time(self, issued: list[datetime]) -> None:
        known = self._known_good_time()
        latest = max([*issued, *([known] if known else [])], default=None)
        if latest is None or latest == known:
            return
        fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".known_good_time.")
        with os.fdopen(fd, "w") as f:
            f.write(latest.isoformat())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._dir / "known_good_time")
