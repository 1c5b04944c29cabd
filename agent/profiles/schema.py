"""The device profile schema: what a ``device_profiles/*.yaml`` file may say.

A profile names a family of devices, says how to recognise one (``detect``), which
provider/delegate chain each model format should try (``runtimes``), how many threads
and how much memory the agent may use, which sensors to read, and which accelerator
must work for the device to be called healthy.

Every model forbids unknown keys, so a typo in a profile fails at start-up with the
file and the field named, instead of being silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from agent.profiles.sensors import NAME_PATTERN, Sensors, StrictModel
from agent.runtimes.base import ProviderSpec, RuntimeOptions

Arch = Literal["aarch64", "x86_64", "armv7l"]

# --- detection ---------------------------------------------------------------------


def _compile(pattern: str | None) -> str | None:
    if pattern is not None:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"invalid regular expression {pattern!r}: {exc}") from exc
    return pattern


class DetectRule(StrictModel):
    """One way to recognise the device. Every condition the rule sets must hold.

    Regular expressions are searched (``re.search``), case-sensitively unless they
    start with ``(?i)``.
    """

    #: Searched in ``/proc/device-tree/model`` (NUL-terminated).
    device_tree_model: str | None = None
    #: Searched in each entry of ``/proc/device-tree/compatible`` (NUL-separated),
    #: e.g. ``^nvidia,tegra234$``. The most reliable SoC identification on ARM boards.
    device_tree_compatible: str | None = None
    #: Searched in ``/proc/cpuinfo``, line-wise (``^`` and ``$`` match at each line).
    #: Readable inside containers, where Docker masks ``/sys/firmware`` and with it the
    #: device tree.
    cpuinfo: str | None = None
    #: Every one of these paths must exist (``/etc/nv_tegra_release``, ``/dev/apex_0``).
    files_exist: tuple[str, ...] = ()
    #: At least one USB device with one of these ``vendor:product`` ids must be present.
    usb_ids: tuple[Annotated[str, Field(pattern=r"^[0-9a-f]{4}:[0-9a-f]{4}$")], ...] = ()
    #: At least one of these onnxruntime execution providers must be available.
    providers_any: tuple[str, ...] = ()

    @field_validator("device_tree_model", "device_tree_compatible", "cpuinfo")
    @classmethod
    def _regex(cls, pattern: str | None) -> str | None:
        return _compile(pattern)

    @field_validator("files_exist")
    @classmethod
    def _absolute(cls, paths: tuple[str, ...]) -> tuple[str, ...]:
        for p in paths:
            if not p.startswith("/"):
                raise ValueError(f"{p!r} is not an absolute path")
        return paths

    @model_validator(mode="after")
    def _not_empty(self) -> DetectRule:
        if not self.model_dump(exclude_defaults=True):
            raise ValueError("a detect rule needs at least one condition")
        return self


# --- provider chains ---------------------------------------------------------------


class NoOptions(StrictModel):
    """A provider that takes no options (threads come from the profile's ``threads``)."""


class TensorrtOptions(StrictModel):
    """TensorRT EP options. Engine and timing caches are kept under the agent's cache dir
    whenever it has one: the first load of a model builds its engine (minutes on a
    Jetson), later loads reuse it."""

    fp16: bool = False
    int8: bool = False
    workspace_mib: int | None = Field(default=None, gt=0)
    #: Run on this DLA core (Xavier, Orin AGX/NX) instead of the GPU.
    dla_core: int | None = Field(default=None, ge=0, le=1)
    device_id: int = Field(default=0, ge=0)


class CudaOptions(StrictModel):
    device_id: int = Field(default=0, ge=0)


class OpenvinoOptions(StrictModel):
    #: ``CPU``, ``GPU``, ``NPU``, ``AUTO:GPU,CPU``...
    device_type: str = Field(default="CPU", pattern=r"^[A-Z]+(\.\d+)?(:[A-Z.0-9,]+)?$")
    precision: Literal["FP32", "FP16", "ACCURACY"] | None = None


class EdgetpuOptions(StrictModel):
    #: ``usb``, ``pci``, or one device: ``usb:0``, ``pci:1``. ``None``: the first found.
    device: Annotated[str, Field(pattern=r"^(usb|pci)(:\d+)?$")] | None = None
    #: The delegate library; the backend's default is ``libedgetpu.so.1``.
    library: str | None = Field(default=None, min_length=1)


class _Link(StrictModel):
    """One link of a chain; each subclass narrows ``name`` to its literal(s)."""

    name: str
    options: BaseModel = NoOptions()

    def spec(self) -> ProviderSpec:
        return ProviderSpec(
            self.name, self.options.model_dump(exclude_none=True, exclude_defaults=True)
        )


class TensorrtLink(_Link):
    name: Literal["tensorrt"]
    options: TensorrtOptions = TensorrtOptions()

    def spec(self) -> ProviderSpec:
        opts = self.options.model_dump(exclude_none=True, exclude_defaults=True)
        if "workspace_mib" in opts:
            opts["workspace_bytes"] = opts.pop("workspace_mib") * 2**20
        return ProviderSpec(self.name, opts)


class CudaLink(_Link):
    name: Literal["cuda"]
    options: CudaOptions = CudaOptions()


class OpenvinoLink(_Link):
    name: Literal["openvino"]
    options: OpenvinoOptions = OpenvinoOptions()


class EdgetpuLink(_Link):
    name: Literal["edgetpu"]
    options: EdgetpuOptions = EdgetpuOptions()


class OnnxPlainLink(_Link):
    """onnxruntime's ``xnnpack`` or ``cpu`` execution provider: no options."""

    name: Literal["xnnpack", "cpu"]
    options: NoOptions = NoOptions()


class TflitePlainLink(_Link):
    """LiteRT's ``xnnpack`` (its default CPU path), ``gpu`` delegate or plain ``cpu`` kernels."""

    name: Literal["xnnpack", "gpu", "cpu"]
    options: NoOptions = NoOptions()


OnnxLink = Annotated[
    TensorrtLink | CudaLink | OpenvinoLink | OnnxPlainLink, Field(discriminator="name")
]
TfliteLink = Annotated[EdgetpuLink | TflitePlainLink, Field(discriminator="name")]


def _short_links(data: Any) -> Any:
    """Let a chain list bare names: ``providers: [xnnpack, cpu]``."""
    if isinstance(data, dict) and isinstance(data.get("providers"), list):
        data = dict(data)
        data["providers"] = [{"name": p} if isinstance(p, str) else p for p in data["providers"]]
    return data


def _check_chain(links: tuple[_Link, ...]) -> None:
    if not links:
        raise ValueError("a chain needs at least one provider")
    names = [link.spec().name for link in links]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"provider listed twice: {', '.join(dupes)}")


class OnnxChain(StrictModel):
    """onnxruntime execution providers, tried in order."""

    providers: tuple[OnnxLink, ...] = (OnnxPlainLink(name="cpu"),)

    @model_validator(mode="before")
    @classmethod
    def _short(cls, data: Any) -> Any:
        return _short_links(data)

    @model_validator(mode="after")
    def _check(self) -> OnnxChain:
        _check_chain(self.providers)
        return self


class TfliteChain(StrictModel):
    """LiteRT delegates, tried in order (``xnnpack`` is LiteRT's default CPU path)."""

    providers: tuple[TfliteLink, ...] = (
        TflitePlainLink(name="xnnpack"),
        TflitePlainLink(name="cpu"),
    )

    @model_validator(mode="before")
    @classmethod
    def _short(cls, data: Any) -> Any:
        return _short_links(data)

    @model_validator(mode="after")
    def _check(self) -> TfliteChain:
        _check_chain(self.providers)
        return self


class Runtimes(StrictModel):
    onnx: OnnxChain = OnnxChain()
    tflite: TfliteChain = TfliteChain()

    def chain(self, fmt: str) -> tuple[ProviderSpec, ...]:
        """The chain for ``fmt`` as :class:`ProviderSpec` links (``KeyError`` if unknown)."""
        if fmt == "onnx":
            return tuple(link.spec() for link in self.onnx.providers)
        if fmt == "tflite":
            return tuple(link.spec() for link in self.tflite.providers)
        raise KeyError(fmt)


# --- resources ---------------------------------------------------------------------


class Threads(StrictModel):
    #: Threads inside one operator; ``None``: the runtime's default (one per core).
    intra_op: int | None = Field(default=None, ge=1, le=256)
    inter_op: int = Field(default=1, ge=1, le=64)


class Memory(StrictModel):
    """How much memory the agent may use, and what must stay free for a new model.

    The limit is the smaller of ``limit_mib`` and ``limit_fraction`` of the total RAM
    (either may be left out), so one profile fits a board's 4 GB and 16 GB variants.
    """

    limit_mib: int | None = Field(default=None, gt=0)
    limit_fraction: float | None = Field(default=None, gt=0, le=1)
    #: Memory that must still be free after a new model is loaded for validation;
    #: below it the update is refused instead of pushing the device into the OOM killer.
    headroom_mib: int = Field(default=256, ge=0)

    def limit_bytes(self, total_bytes: int | None) -> int | None:
        """The agent's memory limit with ``total_bytes`` of RAM (``None``: no limit).

        With ``total_bytes`` unknown (``None``), only ``limit_mib`` applies.
        """
        limits = []
        if self.limit_mib is not None:
            limits.append(self.limit_mib * 2**20)
        if self.limit_fraction is not None and total_bytes is not None:
            limits.append(int(total_bytes * self.limit_fraction))
        return min(limits) if limits else None

    @property
    def headroom_bytes(self) -> int:
        return self.headroom_mib * 2**20


# --- the profile -------------------------------------------------------------------


class Profile(StrictModel):
    """One device profile, as validated from its YAML file."""

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    arch: tuple[Arch, ...] = Field(min_length=1)
    #: The device is this profile when any rule matches. No rules: it matches any
    #: machine of its arch (the ``generic-*`` fallbacks, with priority 0).
    detect: tuple[DetectRule, ...] = ()
    #: When several profiles match, the highest priority wins.
    priority: int = Field(default=0, ge=0, le=1000)
    runtimes: Runtimes = Runtimes()
    threads: Threads = Threads()
    memory: Memory = Memory()
    sensors: Sensors = Sensors()
    #: The accelerator(s) the device is for; the device is healthy only when one of
    #: them serves models. A single short name or a list (any one is enough).
    required_accelerator: tuple[str, ...] = ()
    #: Refuse to run a model partly on the CPU behind the chosen accelerator's back.
    strict_placement: bool = False
    #: The file this profile came from (set by the loader; not a YAML key).
    source: Path | None = Field(default=None, exclude=True)

    @field_validator("required_accelerator", mode="before")
    @classmethod
    def _listify(cls, value: Any) -> Any:
        if value is None:
            return ()
        return (value,) if isinstance(value, str) else value

    @model_validator(mode="after")
    def _accelerator_in_chain(self) -> Profile:
        chained = {spec.name for fmt in ("onnx", "tflite") for spec in self.runtimes.chain(fmt)}
        for name in self.required_accelerator:
            if name not in chained:
                raise ValueError(
                    f"required_accelerator {name!r} is in no runtimes chain of this profile"
                )
            if name == "cpu":
                raise ValueError("required_accelerator cannot be 'cpu'")
        return self

    def chain(self, fmt: str) -> tuple[ProviderSpec, ...]:
        """The provider/delegate chain for model format ``fmt`` (``KeyError`` if unknown)."""
        return self.runtimes.chain(fmt)

    def runtime_options(self, fmt: str, cache_dir: Path | None = None) -> RuntimeOptions:
        """The :class:`RuntimeOptions` that load a ``fmt`` model on this device.

        Raises:
            KeyError: ``fmt`` is not a model format profiles know.
        """
        return RuntimeOptions(
            providers=self.chain(fmt),
            intra_op_threads=self.threads.intra_op,
            inter_op_threads=self.threads.inter_op,
            cache_dir=cache_dir,
            strict_placement=self.strict_placement,
        )
