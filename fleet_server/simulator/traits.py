"""What a simulated device of a profile looks like: its memory, sensors, providers and how
fast it runs a model. Values are plausible for the hardware, not measured.

The provider a device reports is the first link of its profile's chain for the model's
format, named as the agent's runtimes name it (``TensorrtExecutionProvider``, ``XNNPACK``,
``EdgeTPU``...), so the server sees exactly the strings a real agent of that profile sends.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import cache

from agent.profiles import Profile, load_profile
from agent.runtimes.litert import DELEGATE_NAMES
from agent.runtimes.onnx import EP_NAMES

GIB = 1024**3
#: Memory of the typical board of each shipped profile, in GiB (others: 4).
_MEMORY_GIB: dict[str, int] = {
    "raspberry-pi-4": 4,
    "raspberry-pi-5": 8,
    "jetson-orin": 8,
    "jetson-xavier": 16,
    "coral-dev-board": 4,
    "coral-usb": 8,
    "coral-pcie": 16,
    "generic-arm64": 8,
    "generic-x86_64": 16,
    "intel-x86-openvino": 16,
    "rockchip-rk3588": 8,
}
#: Median latency (ms) of a mid-sized vision model on each provider, on an aarch64 board.
_PROVIDER_MS: dict[str, float] = {
    "tensorrt": 2.5,
    "cuda": 4.0,
    "openvino": 6.0,
    "edgetpu": 7.0,
    "gpu": 9.0,
    "xnnpack": 18.0,
    "cpu": 25.0,
}
#: x86 cores run the same model faster than a board's.
_ARCH_FACTOR = {"x86_64": 0.4, "aarch64": 1.0, "armv7l": 2.0}


@dataclass(frozen=True)
class Traits:
    """The fixed properties of one simulated device."""

    profile: str
    mem_total_bytes: int
    has_temperature: bool
    #: Share of the CPU the agent uses at rest, in percent.
    cpu_base: float
    disk_free_bytes: int
    agent_rss_bytes: int

    def provider(self, fmt: str) -> str:
        """The provider (or delegate) this device serves a ``fmt`` model with."""
        return _provider_of(self.profile, fmt)[0]

    def latency_ms(self, fmt: str, model: str) -> float:
        """The median latency of ``model`` on this device, before any update."""
        link, arch = _provider_of(self.profile, fmt)[1:]
        base = _PROVIDER_MS.get(link, 25.0) * _ARCH_FACTOR.get(arch, 1.0)
        return base * (0.5 + 1.5 * _unit(f"model:{model}"))


@cache
def _profile(name: str) -> Profile:
    return load_profile(name)


@cache
def _provider_of(profile: str, fmt: str) -> tuple[str, str, str]:
    """(reported provider, link name, arch) of the first link of the chain for ``fmt``."""
    p = _profile(profile)
    chain = p.runtimes.chain(fmt)
    link = chain[0].name if chain else "cpu"
    names = EP_NAMES if fmt == "onnx" else DELEGATE_NAMES
    return names.get(link, link), link, p.arch[0]


def _unit(key: str) -> float:
    """A stable number in [0, 1) for ``key``."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def pick_profile(device_id: str, weights: dict[str, float], seed: int) -> str:
    """The profile of ``device_id``: stable for a given seed, distributed by ``weights``."""
    total = sum(weights.values())
    x = _unit(f"{seed}:profile:{device_id}") * total
    for name, weight in sorted(weights.items()):
        x -= weight
        if x < 0:
            return name
    return max(weights, key=lambda k: weights[k])


def traits_for(device_id: str, profile: str, seed: int) -> Traits:
    """The traits of ``device_id`` running ``profile`` (stable for a given seed).

    Raises:
        agent.errors.ConfigError: ``profile`` is not a known profile.
    """
    rng = random.Random(f"{seed}:traits:{device_id}")
    p = _profile(profile)
    return Traits(
        profile=profile,
        mem_total_bytes=_MEMORY_GIB.get(profile, 4) * GIB,
        has_temperature=bool(p.sensors.temperatures),
        cpu_base=rng.uniform(4.0, 30.0),
        disk_free_bytes=int(rng.uniform(4, 60) * GIB),
        agent_rss_bytes=int(rng.uniform(120, 380) * 1024**2),
    )
