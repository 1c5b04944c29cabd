"""Device profiles: what kind of device this is, and how to run models on it.

    schema.py   the pydantic models of a ``device_profiles/*.yaml`` file
    loading.py  where profiles are found, and loading one by name or path
    detect.py   choosing the profile that describes this machine, with the reason
    sensors.py  reading a profile's temperatures, loads and flags from sysfs

Typical use::

    detection = detect_profile()                    # or load_profile("jetson-orin")
    options = runtime_options(detection.profile, "onnx", cache_dir)
    backend.load(model_path, options)
"""

from __future__ import annotations

from pathlib import Path

from agent.errors import ConfigError
from agent.profiles.detect import Detection, MachineFacts, detect_profile, normalize_arch
from agent.profiles.loading import (
    list_profiles,
    load_profile,
    load_profile_file,
    parse_profile,
    profile_dirs,
)
from agent.profiles.schema import Profile
from agent.profiles.sensors import SensorReader, SensorReadings, read_sensors
from agent.runtimes.base import RuntimeOptions

__all__ = [
    "Detection",
    "MachineFacts",
    "Profile",
    "SensorReader",
    "SensorReadings",
    "detect_profile",
    "list_profiles",
    "load_profile",
    "load_profile_file",
    "normalize_arch",
    "parse_profile",
    "profile_dirs",
    "read_sensors",
    "runtime_options",
]


def runtime_options(profile: Profile, fmt: str, cache_dir: Path | None = None) -> RuntimeOptions:
    """The :class:`RuntimeOptions` to load a ``fmt`` model on a ``profile`` device.

    Raises:
        ConfigError: ``fmt`` is not a model format that profiles describe.
    """
    try:
        return profile.runtime_options(fmt, cache_dir)
    except KeyError:
        raise ConfigError(f"profile {profile.name!r} has no provider chain for {fmt!r}") from None
