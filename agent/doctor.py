"""``edge-agent doctor``: can this device run models the way its profile says?

For every model format, each link of the profile's provider/delegate chain is tried
on its own (``strict_placement``, no fallback) with a tiny probe model shipped in
``agent/data`` (``y = x + 1`` on a ``[1, 4]`` float32 tensor): the probe is loaded, run
once, and its answer checked. The report says which links work, why the others do
not, how long each took, and whether the profile's required accelerator is usable.

A runtime library that is not installed is reported, not crashed on. The exit code is
non-zero when the required accelerator is unusable, or when no link of an installed
runtime's chain works. A runtime that is not installed at all is only a warning: a
device may serve one format only (its required accelerator still has to work).
"""

from __future__ import annotations

import importlib.metadata
import platform
import re
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import agent
from agent.errors import EdgeError, ModelLoadError
from agent.profiles import Detection, Profile, detect_profile, load_profile, read_sensors
from agent.profiles.detect import available_onnx_providers, normalize_arch
from agent.runtimes import (
    Backend,
    ProviderSpec,
    RuntimeOptions,
    TensorSpec,
    formats,
    get_backend,
)

PROBES: dict[str, Path] = {
    "onnx": Path(agent.__file__).resolve().parent / "data" / "probe.onnx",
    "tflite": Path(agent.__file__).resolve().parent / "data" / "probe.tflite",
}
#: Distributions that provide each format's runtime, in order of preference.
_DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "onnx": ("onnxruntime", "onnxruntime-gpu", "onnxruntime-openvino", "onnxruntime-directml"),
    "tflite": ("ai-edge-litert", "tflite-runtime"),
}
_CHAIN_FAILURE = re.compile(r"^no (?:provider|delegate) could serve the model \((.*)\)$")


@dataclass(frozen=True)
class LinkResult:
    """One link of a chain, tried alone on the probe model."""

    name: str
    options: dict[str, Any]
    ok: bool
    #: Why it failed; empty when it works.
    reason: str = ""
    #: The provider or delegate that served the probe (``TensorrtExecutionProvider``).
    served_by: str | None = None
    #: Time to load the probe (until the failure, for a failed link).
    load_ms: float | None = None
    run_ms: float | None = None


@dataclass(frozen=True)
class FormatReport:
    """One model format: its runtime library, what it offers, and each link's result."""

    format: str
    #: ``onnxruntime 1.20.1``; ``None`` when no runtime for the format is installed.
    runtime: str | None
    installed: bool
    available_providers: tuple[str, ...]
    links: tuple[LinkResult, ...]
    #: Why the runtime is unusable (not installed...), when it is.
    error: str | None = None

    @property
    def works(self) -> bool:
        return any(link.ok for link in self.links)


@dataclass(frozen=True)
class DoctorReport:
    """Everything ``edge-agent doctor`` found; :meth:`to_dict` is the ``diagnostics`` payload."""

    profile: str
    profile_source: str | None
    #: Why this profile: the matched detection rules, or that it was chosen by name.
    reason: str
    #: The profile detection picks on this machine (``None`` when none fits).
    detected: str | None
    arch: str
    python: str
    formats: tuple[FormatReport, ...]
    required_accelerator: tuple[str, ...]
    memory: dict[str, int | None] = field(default_factory=dict)
    sensors: dict[str, Any] = field(default_factory=dict)

    @property
    def accelerator_usable(self) -> bool | None:
        """Whether a required accelerator serves the probe (``None``: nothing required)."""
        if not self.required_accelerator:
            return None
        return any(
            link.ok and link.name in self.required_accelerator
            for report in self.formats
            for link in report.links
        )

    @property
    def problems(self) -> list[str]:
        """What makes the device unhealthy (each one makes :attr:`exit_code` non-zero)."""
        found = []
        if self.accelerator_usable is False:
            names = " or ".join(self.required_accelerator)
            found.append(f"the required accelerator ({names}) is not usable")
        for report in self.formats:
            if report.installed and not report.works:
                found.append(f"no link of the {report.format} chain works")
        return found

    @property
    def warnings(self) -> list[str]:
        return [
            f"{r.format} models cannot be served: {r.error}"
            for r in self.formats
            if not r.installed
        ]

    @property
    def exit_code(self) -> int:
        return 1 if self.problems else 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form of the whole report."""
        out = asdict(self)
        out["required_accelerator"] = list(self.required_accelerator)
        out["formats"] = [
            {
                **asdict(report),
                "available_providers": list(report.available_providers),
                "links": [asdict(link) for link in report.links],
                "works": report.works,
            }
            for report in self.formats
        ]
        out["accelerator_usable"] = self.accelerator_usable
        out["problems"] = self.problems
        out["warnings"] = self.warnings
        out["exit_code"] = self.exit_code
        return out


def _version(fmt: str) -> str | None:
    for dist in _DISTRIBUTIONS.get(fmt, ()):
        try:
            return f"{dist} {importlib.metadata.version(dist)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, EdgeError):
        text = exc.message.removeprefix("probe.onnx: ").removeprefix("probe.tflite: ")
        found = _CHAIN_FAILURE.match(text)
        return found.group(1) if found else text
    line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__


def _probe_feeds(inputs: tuple[TensorSpec, ...]) -> dict[str, np.ndarray[Any, Any]]:
    feeds = {}
    for spec in inputs:
        shape = tuple(1 if d is None else d for d in spec.shape)
        size = int(np.prod(shape, dtype=np.int64))
        feeds[spec.name] = np.arange(size, dtype=spec.np_dtype).reshape(shape)
    return feeds


def _try_link(
    backend: Backend, probe: Path, link: ProviderSpec, profile: Profile, cache: Path
) -> LinkResult:
    options = RuntimeOptions(
        providers=(link,),
        intra_op_threads=profile.threads.intra_op,
        inter_op_threads=profile.threads.inter_op,
        cache_dir=cache,
        strict_placement=True,
        warmup_runs=0,
    )
    start = time.perf_counter()
    try:
        runtime = backend.load(probe, options)
    except Exception as exc:  # doctor reports every failure, whatever its kind
        load_ms = round((time.perf_counter() - start) * 1000, 2)
        return LinkResult(link.name, dict(link.options), False, _reason(exc), load_ms=load_ms)
    load_ms = round((time.perf_counter() - start) * 1000, 2)
    served = runtime.provider
    try:
        feeds = _probe_feeds(runtime.inputs)
        start = time.perf_counter()
        outputs = runtime.run(feeds)
        run_ms = round((time.perf_counter() - start) * 1000, 2)
        expected = next(iter(feeds.values())) + 1
        if not np.allclose(outputs[0], expected):
            reason = f"the probe gave a wrong answer on {served}"
            return LinkResult(link.name, dict(link.options), False, reason, served, load_ms, run_ms)
    except Exception as exc:
        reason = f"loaded, but the probe failed to run: {_reason(exc)}"
        return LinkResult(link.name, dict(link.options), False, reason, served, load_ms)
    finally:
        runtime.close()
    return LinkResult(link.name, dict(link.options), True, "", served, load_ms, run_ms)


def check_format(fmt: str, profile: Profile, cache: Path) -> FormatReport:
    """Try each link of ``profile``'s ``fmt`` chain on the probe model. Never raises."""
    chain = profile.chain(fmt)
    version = _version(fmt)
    try:
        backend = get_backend(fmt)
    except (ModelLoadError, ImportError) as exc:
        error = _reason(exc)
        links = tuple(LinkResult(s.name, dict(s.options), False, error) for s in chain)
        return FormatReport(fmt, version, False, (), links, error)
    providers = tuple(backend.available_providers())
    probe = PROBES[fmt]
    if not probe.is_file():
        error = f"the probe model {probe} is missing"
        links = tuple(LinkResult(s.name, dict(s.options), False, error) for s in chain)
        return FormatReport(fmt, version, True, providers, links, None)
    links = tuple(_try_link(backend, probe, link, profile, cache) for link in chain)
    return FormatReport(fmt, version, True, providers, links)


def _memory(profile: Profile, root: Path) -> dict[str, int | None]:
    total: int | None = None
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        total = None
    return {
        "total_bytes": total,
        "limit_bytes": profile.memory.limit_bytes(total),
        "headroom_bytes": profile.memory.headroom_bytes,
    }


def run_doctor(profile_name: str | None = None, root: Path = Path("/")) -> DoctorReport:
    """Check this device against its profile (detected, or ``profile_name``).

    Raises:
        ConfigError: ``profile_name`` is unknown or invalid, a profile file is invalid,
            or (with no ``profile_name``) no profile fits this machine.
    """
    arch = normalize_arch(platform.machine())
    onnx_providers = available_onnx_providers()
    detection: Detection | None = None
    if profile_name is None:
        detection = detect_profile(root, onnx_providers, arch)
        profile, reason = detection.profile, detection.reason
    else:
        profile = load_profile(profile_name)
        reason = "chosen by name"
        try:
            detection = detect_profile(root, onnx_providers, arch)
        except EdgeError:
            detection = None
    with tempfile.TemporaryDirectory(prefix="edge-doctor-") as cache:
        reports = tuple(check_format(fmt, profile, Path(cache)) for fmt in formats())
    return DoctorReport(
        profile=profile.name,
        profile_source=str(profile.source) if profile.source else None,
        reason=reason,
        detected=detection.profile.name if detection else None,
        arch=arch,
        python=platform.python_version(),
        formats=reports,
        required_accelerator=profile.required_accelerator,
        memory=_memory(profile, root),
        sensors=read_sensors(profile, root),
    )


def _table(headers: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in [headers, *rows]) for i in range(len(headers))]

    def line(cells: list[str]) -> str:
        parts = [
            c.rjust(w) if i in right else c.ljust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        ]
        return "  ".join(parts).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def format_report(report: DoctorReport) -> str:
    """The report as an aligned, human-readable text table."""
    facts = [
        ("profile", report.profile),
        ("why", report.reason),
        ("detected", report.detected or "none fits"),
        ("source", report.profile_source or "-"),
        ("arch", report.arch),
        ("python", report.python),
    ]
    for fmt in report.formats:
        offers = ", ".join(fmt.available_providers) or "-"
        facts.append(
            (f"{fmt.format} runtime", f"{fmt.runtime or 'not installed'}; offers {offers}")
        )
    if report.memory.get("total_bytes"):
        mib = {k: (v // 2**20 if v is not None else None) for k, v in report.memory.items()}
        facts.append(
            (
                "memory",
                f"{mib['total_bytes']} MiB total, agent limit {mib['limit_bytes'] or '-'} "
                f"MiB, headroom {mib['headroom_bytes']} MiB",
            )
        )
    temperature = report.sensors.get("temperature_c")
    if temperature is not None:
        facts.append(("temperature", f"{temperature:.1f} °C"))
    width = max(len(k) for k, _ in facts)
    lines = [f"{k.ljust(width)}  {v}" for k, v in facts]
    rows = []
    for fmt in report.formats:
        for link in fmt.links:
            detail = link.served_by if link.ok else link.reason
            rows.append(
                [
                    fmt.format,
                    link.name,
                    "ok" if link.ok else "FAILED",
                    _ms(link.load_ms),
                    _ms(link.run_ms),
                    detail or "",
                ]
            )
    lines += [
        "",
        *_table(["FORMAT", "LINK", "RESULT", "LOAD ms", "RUN ms", "DETAIL"], rows, {3, 4}),
    ]
    lines.append("")
    if report.required_accelerator:
        names = " or ".join(report.required_accelerator)
        state = "usable" if report.accelerator_usable else "NOT USABLE"
        lines.append(f"required accelerator: {names}: {state}")
    else:
        lines.append("required accelerator: none")
    lines += [f"warning: {w}" for w in report.warnings]
    lines += [f"problem: {p}" for p in report.problems]
    lines.append(
        "result: " + ("OK" if report.exit_code == 0 else f"FAIL (exit {report.exit_code})")
    )
    return "\n".join(lines)
