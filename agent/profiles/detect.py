"""Hardware detection: which device profile describes this machine, and why.

Every fact is read under ``root`` (``/`` on a device; a fake tree in tests), lazily
and at most once: the device-tree model and compatible strings, ``/proc/cpuinfo``, the
USB ids under ``/sys/bus/usb/devices``, and the onnxruntime execution providers
(imported only when a rule asks for them).
"""

from __future__ import annotations

import platform
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from agent.errors import ConfigError, EdgeError
from agent.profiles.loading import list_profiles
from agent.profiles.schema import DetectRule, Profile

_ARCH_ALIASES = {"arm64": "aarch64", "amd64": "x86_64", "x64": "x86_64", "armv8l": "armv7l"}


def normalize_arch(machine: str) -> str:
    """``platform.machine()`` in the names profiles use (``arm64`` -> ``aarch64``...)."""
    m = machine.strip().lower()
    return _ARCH_ALIASES.get(m, m)


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def available_onnx_providers() -> frozenset[str]:
    """The execution providers of the installed onnxruntime (empty when it is missing)."""
    from agent.runtimes import get_backend

    try:
        return frozenset(get_backend("onnx").available_providers())
    except (EdgeError, ImportError):
        return frozenset()


class MachineFacts:
    """What detection rules can ask about the machine under ``root``, read on demand."""

    def __init__(
        self, root: Path, arch: str, available_providers: set[str] | frozenset[str] | None
    ) -> None:
        self.root = root
        self.arch = arch
        self._providers = None if available_providers is None else frozenset(available_providers)

    def path(self, absolute: str) -> Path:
        return self.root / absolute.lstrip("/")

    @cached_property
    def device_tree_model(self) -> str | None:
        text = _read_text(self.path("/proc/device-tree/model"))
        return None if text is None else text.rstrip("\x00").strip()

    @cached_property
    def device_tree_compatible(self) -> tuple[str, ...]:
        text = _read_text(self.path("/proc/device-tree/compatible"))
        return () if text is None else tuple(c for c in text.split("\x00") if c)

    @cached_property
    def cpuinfo(self) -> str | None:
        return _read_text(self.path("/proc/cpuinfo"))

    @cached_property
    def usb_ids(self) -> frozenset[str]:
        ids = set()
        devices = self.path("/sys/bus/usb/devices")
        try:
            entries = list(devices.iterdir())
        except OSError:
            return frozenset()
        for dev in entries:
            vendor = _read_text(dev / "idVendor")
            product = _read_text(dev / "idProduct")
            if vendor and product:
                ids.add(f"{vendor.strip().lower()}:{product.strip().lower()}")
        return frozenset(ids)

    @cached_property
    def providers(self) -> frozenset[str]:
        return available_onnx_providers() if self._providers is None else self._providers

    def exists(self, absolute: str) -> bool:
        return self.path(absolute).exists()


def match_rule(rule: DetectRule, facts: MachineFacts) -> tuple[str, ...] | None:
    """Why ``rule`` matches (one sentence per condition), or ``None`` when it does not."""
    why: list[str] = []
    if rule.device_tree_model is not None:
        model = facts.device_tree_model
        if model is None or not re.search(rule.device_tree_model, model):
            return None
        why.append(f"device-tree model {model!r} matches /{rule.device_tree_model}/")
    if rule.device_tree_compatible is not None:
        pattern = rule.device_tree_compatible
        hit = next((c for c in facts.device_tree_compatible if re.search(pattern, c)), None)
        if hit is None:
            return None
        why.append(f"device-tree compatible {hit!r} matches /{pattern}/")
    if rule.cpuinfo is not None:
        info = facts.cpuinfo
        found = None if info is None else re.search(rule.cpuinfo, info, re.MULTILINE)
        if found is None:
            return None
        why.append(f"/proc/cpuinfo has {found.group(0).strip()!r}")
    for path in rule.files_exist:
        if not facts.exists(path):
            return None
        why.append(f"{path} exists")
    if rule.usb_ids:
        present = sorted(set(rule.usb_ids) & facts.usb_ids)
        if not present:
            return None
        why.append(f"USB device {present[0]} is present")
    if rule.providers_any:
        have = [p for p in rule.providers_any if p in facts.providers]
        if not have:
            return None
        why.append(f"onnxruntime offers {have[0]}")
    return tuple(why)


def match_profile(profile: Profile, facts: MachineFacts) -> tuple[str, ...] | None:
    """Why ``profile`` fits the machine, or ``None``.

    A profile fits when the arch is one of its own and any of its rules matches; a
    profile without rules fits any machine of its arch (an empty reason).
    """
    if facts.arch not in profile.arch:
        return None
    if not profile.detect:
        return ()
    for rule in profile.detect:
        why = match_rule(rule, facts)
        if why is not None:
            return why
    return None


@dataclass(frozen=True)
class Detection:
    """The profile chosen for a machine, and why."""

    profile: Profile
    arch: str
    #: The conditions that matched; empty when the profile is a generic fallback.
    matched: tuple[str, ...]
    #: Every profile that fit, best first (the chosen one included).
    candidates: tuple[str, ...]

    @property
    def reason(self) -> str:
        if self.matched:
            return "; ".join(self.matched)
        return f"no specific profile matched; the fallback for {self.arch}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "profile": self.profile.name,
            "arch": self.arch,
            "reason": self.reason,
            "matched": list(self.matched),
            "candidates": list(self.candidates),
        }


def detect_profile(
    root: Path = Path("/"),
    available_providers: set[str] | frozenset[str] | None = None,
    arch: str | None = None,
    profiles: Sequence[Profile] | None = None,
) -> Detection:
    """Choose the profile that describes the machine under ``root``.

    Among the profiles that fit (see :func:`match_profile`), the highest ``priority``
    wins; then the one whose rule matched more conditions; then the first by name.

    Args:
        root: where ``/proc``, ``/sys``, ``/etc`` and ``/dev`` are read.
        available_providers: onnxruntime execution providers; ``None`` asks onnxruntime.
        arch: the CPU architecture; ``None`` uses ``platform.machine()``.
        profiles: the candidates; ``None`` loads them with :func:`list_profiles`.

    Raises:
        ConfigError: a profile file is invalid, or no profile fits the machine.
    """
    facts = MachineFacts(root, normalize_arch(arch or platform.machine()), available_providers)
    fitting: list[tuple[Profile, tuple[str, ...]]] = []
    for profile in list_profiles() if profiles is None else profiles:
        why = match_profile(profile, facts)
        if why is not None:
            fitting.append((profile, why))
    if not fitting:
        raise ConfigError(
            f"no device profile fits this machine (arch {facts.arch}); choose one with "
            "--profile or add one to /etc/edge-agent/profiles",
            code="profile_not_found",
        )
    fitting.sort(key=lambda pw: (-pw[0].priority, -len(pw[1]), pw[0].name))
    best, why = fitting[0]
    return Detection(best, facts.arch, why, tuple(p.name for p, _ in fitting))
