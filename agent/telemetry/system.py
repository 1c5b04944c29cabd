"""The ``system`` part of telemetry: CPU, memory, disk, and the profile's sensors.

:class:`SystemCollector` is built once; each :meth:`SystemCollector.read` costs a few
``/proc`` and sysfs reads and never blocks. ``cpu_percent`` is the whole machine's CPU
use since the previous read (the first read measures from when the collector was
built). ``mem_used_bytes`` is total minus *available* memory (what the kernel could not
hand out without swapping), not the page-cache-inclusive "used".

A sensor that the device lacks is left out, never sent as ``null`` or zero.
"""

from __future__ import annotations

import logging
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil

from agent.profiles.sensors import SensorReader
from agent.protocol.documents import SystemTelemetry

if TYPE_CHECKING:
    from agent.profiles.schema import Profile

log = logging.getLogger("agent.telemetry")


@dataclass(frozen=True, slots=True)
class SystemReading:
    """One reading of the system gauges; sensor maps hold only the sensors present."""

    cpu_percent: float
    mem_used_bytes: int
    mem_total_bytes: int
    agent_rss_bytes: int
    disk_free_bytes: int
    temperature_c: float | None = None
    temperatures_c: dict[str, float] = field(default_factory=dict)
    loads_percent: dict[str, float] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)

    def to_document(self) -> SystemTelemetry:
        """The protocol's required ``system`` fields (``temperature_c`` only when read)."""
        return SystemTelemetry(
            cpu_percent=self.cpu_percent,
            mem_used_bytes=self.mem_used_bytes,
            mem_total_bytes=self.mem_total_bytes,
            agent_rss_bytes=self.agent_rss_bytes,
            disk_free_bytes=self.disk_free_bytes,
            temperature_c=self.temperature_c,
        )

    def extra_fields(self) -> dict[str, Any]:
        """Fields beyond the protocol's minimum, each only when it has something in it.

        ``temperatures_c`` (every sensor, by name), ``loads_percent`` (accelerator loads)
        and ``flags`` (e.g. the Raspberry Pi's ``throttled.under_voltage``).
        """
        extra: dict[str, Any] = {}
        if self.temperatures_c:
            extra["temperatures_c"] = dict(self.temperatures_c)
        if self.loads_percent:
            extra["loads_percent"] = dict(self.loads_percent)
        if self.flags:
            extra["flags"] = dict(self.flags)
        return extra


def _busy_and_total(times: Any) -> tuple[float, float]:
    """CPU seconds spent busy and in all, from :func:`psutil.cpu_times`."""
    total = sum(times)
    # On Linux guest time is already counted in user time: do not count it twice.
    total -= getattr(times, "guest", 0.0) + getattr(times, "guest_nice", 0.0)
    idle = times.idle + getattr(times, "iowait", 0.0)
    return total - idle, total


def _existing(path: Path) -> Path:
    """``path``, or its nearest existing parent (the state dir may not exist yet)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return Path("/")


class SystemCollector:
    """Reads the system gauges and ``profile``'s sensors (under ``root``, for tests)."""

    def __init__(self, profile: Profile, state_dir: Path, root: Path = Path("/")) -> None:
        self._sensors = SensorReader(profile.sensors, root)
        self._state_dir = Path(state_dir)
        self._process = psutil.Process()
        self._lock = threading.Lock()
        self._last_cpu = _busy_and_total(psutil.cpu_times())
        self._last: SystemReading | None = None

    def _cpu_percent(self) -> float:
        busy, total = _busy_and_total(psutil.cpu_times())
        with self._lock:
            last_busy, last_total = self._last_cpu
            self._last_cpu = (busy, total)
        elapsed = total - last_total
        if elapsed <= 0:
            return 0.0
        return round(min(100.0, max(0.0, (busy - last_busy) / elapsed * 100.0)), 1)

    def _disk_free(self) -> int:
        try:
            return shutil.disk_usage(_existing(self._state_dir)).free
        except OSError as exc:
            log.warning("cannot read free space of %s: %s", self._state_dir, exc)
            return 0

    def read(self) -> SystemReading:
        """Read every gauge now. Never raises: an unreadable sensor is left out.

        CPU use is measured since the previous call, whoever made it.
        """
        memory = psutil.virtual_memory()
        sensors = self._sensors.read()
        reading = SystemReading(
            cpu_percent=self._cpu_percent(),
            mem_used_bytes=max(0, memory.total - memory.available),
            mem_total_bytes=memory.total,
            agent_rss_bytes=self._process.memory_info().rss,
            disk_free_bytes=self._disk_free(),
            temperature_c=sensors.max_temperature_c,
            temperatures_c=sensors.temperatures_c,
            loads_percent=sensors.loads_percent,
            flags=sensors.flags,
        )
        with self._lock:
            self._last = reading
        return reading

    @property
    def last(self) -> SystemReading | None:
        """The most recent :meth:`read`, or ``None`` before the first (for Prometheus)."""
        with self._lock:
            return self._last
