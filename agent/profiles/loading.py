"""Finding and loading device profile files.

Profiles are looked up, in order, in ``$EDGE_AGENT_PROFILES_DIR`` (one or more folders,
``os.pathsep``-separated), ``/etc/edge-agent/profiles``, the source tree's
``device_profiles/`` and ``{sys.prefix}/share/edge-fleet/device_profiles`` (where a wheel
installs them). A profile in an earlier folder hides one of the same name in a later
folder, so an operator can override a shipped profile without editing it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

import agent
from agent.errors import ConfigError
from agent.profiles.schema import Profile

ENV_DIR = "EDGE_AGENT_PROFILES_DIR"
ETC_DIR = Path("/etc/edge-agent/profiles")
_SUFFIXES = (".yaml", ".yml")


def profile_dirs() -> list[Path]:
    """The folders profiles are read from, highest precedence first (existing or not)."""
    dirs = [Path(p) for p in os.environ.get(ENV_DIR, "").split(os.pathsep) if p]
    dirs.append(ETC_DIR)
    dirs.append(Path(agent.__file__).resolve().parent.parent / "device_profiles")
    dirs.append(Path(sys.prefix) / "share" / "edge-fleet" / "device_profiles")
    return dirs


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        loc = ".".join(str(x) for x in err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_profile(text: str, source: Path) -> Profile:
    """Validate the YAML ``text`` of a profile; ``source`` names it in errors.

    Raises:
        ConfigError: the YAML does not parse, or a field is missing, unknown or invalid
            (the message names the file and the field).
    """
    try:
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{source}: invalid YAML{line}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a profile must be a YAML mapping")
    if "source" in data:
        raise ConfigError(f"{source}: source: Extra inputs are not permitted")
    try:
        profile = Profile.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_describe(exc)}") from exc
    if source.suffix in _SUFFIXES and source.stem != profile.name:
        raise ConfigError(
            f"{source}: name: {profile.name!r} differs from the file name {source.stem!r}"
        )
    return profile.model_copy(update={"source": source})


def load_profile_file(path: Path) -> Profile:
    """Load and validate one profile file.

    Raises:
        ConfigError: the file cannot be read or is not a valid profile.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read profile: {exc}") from exc
    return parse_profile(text, path)


def _files(dirs: Iterable[Path]) -> dict[str, Path]:
    """Profile name (file stem) -> file, earlier folders winning."""
    found: dict[str, Path] = {}
    for d in dirs:
        if not d.is_dir():
            continue
        for path in sorted(d.iterdir()):
            if path.suffix in _SUFFIXES and path.is_file():
                found.setdefault(path.stem, path)
    return found


def list_profiles(dirs: Sequence[Path] | None = None) -> list[Profile]:
    """Every profile visible from ``dirs`` (default :func:`profile_dirs`), sorted by name.

    Raises:
        ConfigError: a profile file is invalid.
    """
    files = _files(profile_dirs() if dirs is None else dirs)
    return [load_profile_file(files[name]) for name in sorted(files)]


def load_profile(name_or_path: str | Path, dirs: Sequence[Path] | None = None) -> Profile:
    """A profile by name (``raspberry-pi-5``) or by the path of a YAML file.

    Raises:
        ConfigError: no such profile, or it is invalid.
    """
    text = str(name_or_path)
    path = Path(text)
    if isinstance(name_or_path, Path) or "/" in text or path.suffix in _SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"{path}: no such profile file")
        return load_profile_file(path)
    files = _files(profile_dirs() if dirs is None else dirs)
    if text not in files:
        known = ", ".join(sorted(files)) or "none"
        raise ConfigError(f"unknown device profile {text!r} (known: {known})")
    return load_profile_file(files[text])
