"""Reading a profile's sensors: temperatures, loads and status flags from sysfs.

A :class:`SensorReader` resolves the profile's globs once, when it is built; each
:meth:`SensorReader.read` then only opens and parses the files it found, so the
telemetry tick can call it every few seconds. A sensor whose file is absent, or that
cannot be read right now (a thermal zone answering ``EINVAL``), is left out of the
reading rather than reported as zero.
"""

from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

if TYPE_CHECKING:
    from agent.profiles.schema import Profile

#: Names of profiles and sensors.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]{0,63}$"


class StrictModel(BaseModel):
    """Base of every profile model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- what a profile's ``sensors`` section may say ------------------------------------


class _Sensor(StrictModel):
    """A value read from a sysfs file.

    ``path`` is a glob, or a list of globs tried in order (the first that matches
    anything wins: kernels move files between releases). With a ``label_file``, or when
    the glob matches several files, each file becomes ``{name}.{label}``: the label is
    read from ``label_file`` beside it (a thermal zone's ``type``), else it is the name
    of the folder holding it.
    """

    name: str = Field(pattern=NAME_PATTERN)
    path: tuple[str, ...] = Field(min_length=1)
    label_file: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.-]+$")

    @field_validator("path", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        return (value,) if isinstance(value, str) else value

    @field_validator("path")
    @classmethod
    def _absolute(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for p in paths:
            if not p.startswith("/"):
                raise ValueError(f"{p!r} is not an absolute path")
        return paths


class NumericSensor(_Sensor):
    """The first number in the file, times ``scale`` (``52300`` x 0.001 = 52.3 °C).

    Taking the first number also reads devfreq's ``load`` files (``37@600000000Hz``).
    """

    scale: float = 1.0


class FlagsSensor(_Sensor):
    """An integer bit field whose bits are named, e.g. the Raspberry Pi's ``get_throttled``."""

    base: Literal[2, 8, 10, 16] = 16
    bits: dict[int, Annotated[str, Field(pattern=NAME_PATTERN)]] = Field(min_length=1)

    @field_validator("bits")
    @classmethod
    def _bit_range(cls, bits: dict[int, str]) -> dict[int, str]:
        for bit in bits:
            if not 0 <= bit < 64:
                raise ValueError(f"bit {bit} is outside 0..63")
        return bits


class Sensors(StrictModel):
    temperatures: tuple[NumericSensor, ...] = ()
    loads: tuple[NumericSensor, ...] = ()
    flags: tuple[FlagsSensor, ...] = ()

    @model_validator(mode="after")
    def _unique_names(self) -> Sensors:
        for group in (self.temperatures, self.loads, self.flags):
            names = [s.name for s in group]
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"sensor name used twice: {', '.join(dupes)}")
        return self


# --- reading -------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
_DIGITS = re.compile(r"(\d+)")


def _natural(path: str) -> list[Any]:
    """Sort key that puts ``thermal_zone2`` before ``thermal_zone10``."""
    return [int(p) if p.isdigit() else p for p in _DIGITS.split(path)]


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(256)
    except OSError:
        return None


def _resolve(sensor: NumericSensor | FlagsSensor, root: Path) -> list[tuple[str, str]]:
    """``(key, file)`` for each file the sensor's first matching glob finds under ``root``."""
    base = glob.escape(str(root).rstrip("/"))
    for pattern in sensor.path:
        files = sorted(glob.glob(base + pattern), key=_natural)
        if files:
            break
    else:
        return []
    if sensor.label_file is None and len(files) == 1:
        return [(sensor.name, files[0])]
    keyed: list[tuple[str, str]] = []
    seen: set[str] = set()
    for file in files:
        folder = Path(file).parent
        label = None
        if sensor.label_file is not None:
            text = _read(str(folder / sensor.label_file))
            label = text.strip() if text else None
        key = f"{sensor.name}.{label or folder.name}"
        if key in seen:
            key = f"{key}.{folder.name}"
        seen.add(key)
        keyed.append((key, file))
    return keyed


@dataclass(frozen=True)
class SensorReadings:
    """One reading of every sensor present; absent sensors have no key."""

    temperatures_c: dict[str, float] = field(default_factory=dict)
    loads_percent: dict[str, float] = field(default_factory=dict)
    flags: dict[str, bool] = field(default_factory=dict)

    @property
    def max_temperature_c(self) -> float | None:
        """The hottest temperature read (the telemetry's ``temperature_c``), or ``None``."""
        return max(self.temperatures_c.values()) if self.temperatures_c else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form; ``temperature_c`` (the hottest) only when a temperature was read."""
        out: dict[str, Any] = {
            "temperatures_c": dict(self.temperatures_c),
            "loads_percent": dict(self.loads_percent),
            "flags": dict(self.flags),
        }
        hottest = self.max_temperature_c
        if hottest is not None:
            out["temperature_c"] = hottest
        return out


class SensorReader:
    """Reads a profile's sensors; build it once, call :meth:`read` every tick."""

    def __init__(self, sensors: Sensors, root: Path = Path("/")) -> None:
        self._temperatures = [
            (key, file, s.scale) for s in sensors.temperatures for key, file in _resolve(s, root)
        ]
        self._loads = [
            (key, file, s.scale) for s in sensors.loads for key, file in _resolve(s, root)
        ]
        self._flags = [(key, file, s) for s in sensors.flags for key, file in _resolve(s, root)]

    @property
    def files(self) -> list[str]:
        """Every file this reader reads (for diagnostics)."""
        return [f for _, f, _ in self._temperatures + self._loads] + [f for _, f, _ in self._flags]

    @staticmethod
    def _numbers(entries: list[tuple[str, str, float]]) -> dict[str, float]:
        values: dict[str, float] = {}
        for key, file, scale in entries:
            text = _read(file)
            found = _NUMBER.search(text) if text else None
            if found is not None:
                values[key] = round(float(found.group(0)) * scale, 3)
        return values

    def read(self) -> SensorReadings:
        """Read every resolved sensor now. Never raises: unreadable sensors are left out."""
        flags: dict[str, bool] = {}
        for key, file, sensor in self._flags:
            text = _read(file)
            try:
                value = int(text.strip(), sensor.base) if text else None
            except ValueError:
                value = None
            if value is not None:
                for bit, name in sensor.bits.items():
                    flags[f"{key}.{name}"] = bool(value >> bit & 1)
        return SensorReadings(self._numbers(self._temperatures), self._numbers(self._loads), flags)


def read_sensors(profile: Profile, root: Path = Path("/")) -> dict[str, Any]:
    """One reading of ``profile``'s sensors under ``root``, as :meth:`SensorReadings.to_dict`.

    This resolves the globs on every call; a caller that reads repeatedly (the
    telemetry tick) should keep a :class:`SensorReader` instead. Never raises.
    """
    return SensorReader(profile.sensors, root).read().to_dict()
