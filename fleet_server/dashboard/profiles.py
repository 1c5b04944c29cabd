"""What a device's profile means, for the device page: the description and the runtime
chains from the agent's own profile files (the ones the server knows)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache

from agent.errors import EdgeError
from agent.profiles import list_profiles

log = logging.getLogger("fleet_server.dashboard")


@dataclass(frozen=True)
class ProfileInfo:
    """A profile as the device page describes it."""

    name: str
    description: str
    arch: tuple[str, ...]
    onnx: tuple[str, ...]
    tflite: tuple[str, ...]
    accelerator: tuple[str, ...]


@cache
def known_profiles() -> dict[str, ProfileInfo]:
    """The profiles this server knows, by name (read once; empty if they cannot be read)."""
    try:
        profiles = list_profiles()
    except EdgeError as exc:
        log.warning("dashboard: cannot read the device profiles: %s", exc)
        return {}
    return {
        p.name: ProfileInfo(
            name=p.name,
            description=" ".join(p.description.split()),
            arch=tuple(str(a) for a in p.arch),
            onnx=tuple(link.spec().name for link in p.runtimes.onnx.providers),
            tflite=tuple(link.spec().name for link in p.runtimes.tflite.providers),
            accelerator=p.required_accelerator,
        )
        for p in profiles
    }


def profile_info(name: str | None) -> ProfileInfo | None:
    """The profile named ``name``, or ``None`` when unknown here."""
    return known_profiles().get(name) if name else None
