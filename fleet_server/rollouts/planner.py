"""Planning a rollout: which devices, which variant for each, in which wave.

The target is resolved once, when the rollout is created; devices enrolled later are not
added (create another rollout for them). The order decides who goes first: devices that
are online now lead (a canary that is offline would only wait out the dwell time), then a
stable pseudo-random order (a hash of the release and the device id), so consecutive
rollouts do not always pick the same canary... and the same rollout plans the same way.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from fleet_server.domain import ModelRelease
from fleet_server.errors import ValidationError
from fleet_server.integrations import compatible_profiles
from fleet_server.rollouts.domain import DeviceState, Reason, RolloutSpec
from fleet_server.rollouts.waves import parse_waves, split, wave_sizes
from fleet_server.store import releases
from fleet_server.store.rollout_devices import Candidate, target_devices
from fleet_server.store.rollouts import PlannedDevice

DEFAULT_VARIANT = "default"
#: The wave of devices that are planned but never assigned (no variant for their profile).
UNPLANNED = -1


def choose_variant(
    release: ModelRelease, profile: str | None, chosen: dict[str, str]
) -> tuple[str | None, str]:
    """The variant of ``release`` for a device of ``profile``: ``(variant, "")``, or
    ``(None, why)`` when there is none. ``chosen`` maps profiles (or ``*``) to variants.
    """
    if profile is None:
        return None, "the device has not reported its profile"
    fits = [v.variant for v in release.variants if profile in compatible_profiles(v.manifest)]
    wanted = chosen.get(profile) or chosen.get("*")
    if wanted is not None:
        if wanted in fits:
            return wanted, ""
        return None, f"variant {wanted} is not built for profile {profile}"
    if DEFAULT_VARIANT in fits:
        return DEFAULT_VARIANT, ""
    if len(fits) == 1:
        return fits[0], ""
    if not fits:
        return None, f"no variant of {release.name} {release.version} is built for {profile}"
    return None, f"several variants fit profile {profile} ({', '.join(fits)}); choose one"


def _order(spec: RolloutSpec, candidates: list[Candidate]) -> list[Candidate]:
    def key(c: Candidate) -> tuple[bool, str]:
        digest = hashlib.sha256(f"{spec.model}@{spec.version}/{c.device_id}".encode())
        return (not c.online, digest.hexdigest())

    return sorted(candidates, key=key)


def plan(
    session: Session, spec: RolloutSpec, *, now: datetime, stale_after: timedelta
) -> tuple[list[PlannedDevice], list[int]]:
    """The planned devices and the size of each wave.

    Raises:
        NotFound: the release does not exist.
        ValidationError: a variant the spec names does not exist (``unknown_variant``),
            a device named in the target does not exist (``unknown_device``), or no
            device matches the target or none can run the release (``no_devices``).
    """
    release = releases.get_release(session, spec.model, spec.version)
    known = {v.variant for v in release.variants}
    for named in spec.variants.values():
        if named not in known:
            raise ValidationError(
                f"{spec.model} {spec.version} has no variant {named!r}", code="unknown_variant"
            )
    candidates = target_devices(session, spec.target, now=now, stale_after=stale_after)
    missing = sorted(set(spec.target.devices) - {c.device_id for c in candidates})
    if missing:
        raise ValidationError(
            f"unknown or revoked devices: {', '.join(missing[:10])}", code="unknown_device"
        )
    if not candidates:
        raise ValidationError("the target matches no device", code="no_devices")
    eligible: list[tuple[Candidate, str]] = []
    skipped: list[PlannedDevice] = []
    for c in _order(spec, candidates):
        variant, why = choose_variant(release, c.profile, spec.variants)
        if variant is None:
            reason = Reason.of("no_variant", why)
            skipped.append(
                PlannedDevice(c.device_id, UNPLANNED, c.profile, None, DeviceState.SKIPPED, reason)
            )
        else:
            eligible.append((c, variant))
    if not eligible:
        first = skipped[0].reason or {}
        raise ValidationError(
            f"no targeted device can run this release: {first.get('message')}", code="no_devices"
        )
    sizes = wave_sizes(parse_waves(",".join(spec.waves)), len(eligible))
    planned = [
        PlannedDevice(c.device_id, wave, c.profile, variant)
        for wave, group in enumerate(split(eligible, sizes))
        for c, variant in group
    ]
    return planned + skipped, sizes
