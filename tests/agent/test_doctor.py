"""``edge-agent doctor`` on this machine, with real onnxruntime and LiteRT probes."""

from __future__ import annotations

import ctypes.util
import json
import platform
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from agent.doctor import DoctorReport, format_report, run_doctor
from agent.errors import ConfigError
from agent.profiles import normalize_arch
from agent.runtimes import get_backend

REPO = Path(__file__).resolve().parents[2]
ONNX_PROVIDERS = set(get_backend("onnx").available_providers())
GPU_EPS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}

needs_x86_64 = pytest.mark.skipif(
    normalize_arch(platform.machine()) != "x86_64", reason="checks the x86_64 fallback"
)


@pytest.fixture
def empty_root(tmp_path: Path) -> Path:
    """A root with no board files: detection falls back on the arch alone."""
    root = tmp_path / "root"
    root.mkdir()
    return root


def links(report: DoctorReport, fmt: str) -> dict[str, tuple[bool, str, str | None]]:
    found = next(f for f in report.formats if f.format == fmt)
    return {link.name: (link.ok, link.reason, link.served_by) for link in found.links}


@needs_x86_64
def test_doctor_on_this_machine_is_healthy(empty_root: Path) -> None:
    if "OpenVINOExecutionProvider" in ONNX_PROVIDERS:
        pytest.skip("this onnxruntime has OpenVINO: the machine is intel-x86-openvino")
    report = run_doctor(root=empty_root)
    assert report.profile == "generic-x86_64"
    assert report.detected == "generic-x86_64"
    assert "fallback for x86_64" in report.reason
    assert links(report, "onnx") == {"cpu": (True, "", "CPUExecutionProvider")}
    assert links(report, "tflite") == {
        "xnnpack": (True, "", "XNNPACK"),
        "cpu": (True, "", "CPU"),
    }
    onnx = report.formats[0]
    assert onnx.runtime is not None and onnx.runtime.startswith("onnxruntime")
    assert "CPUExecutionProvider" in onnx.available_providers
    assert all(link.load_ms is not None and link.load_ms >= 0 for link in onnx.links)
    assert report.accelerator_usable is None
    assert report.problems == []
    assert report.exit_code == 0
    text = format_report(report)
    assert "result: OK" in text
    assert "required accelerator: none" in text


def test_jetson_profile_here_fails_on_the_accelerator(empty_root: Path) -> None:
    if GPU_EPS & ONNX_PROVIDERS:
        pytest.skip("this onnxruntime build has GPU providers")
    report = run_doctor("jetson-orin", root=empty_root)
    assert report.profile == "jetson-orin"
    assert report.reason == "chosen by name"
    assert report.detected != "jetson-orin"
    result = links(report, "onnx")
    assert result["tensorrt"] == (
        False,
        "TensorrtExecutionProvider: not available on this device",
        None,
    )
    assert result["cuda"][0] is False
    assert "CUDAExecutionProvider" in result["cuda"][1]
    assert result["cpu"] == (True, "", "CPUExecutionProvider")
    assert report.accelerator_usable is False
    assert report.problems == ["the required accelerator (tensorrt or cuda) is not usable"]
    assert report.exit_code == 1
    text = format_report(report)
    assert "required accelerator: tensorrt or cuda: NOT USABLE" in text
    assert "result: FAIL (exit 1)" in text


def test_coral_profile_here_fails_without_libedgetpu(empty_root: Path) -> None:
    if ctypes.util.find_library("edgetpu"):
        pytest.skip("libedgetpu is installed here")
    report = run_doctor("coral-usb", root=empty_root)
    result = links(report, "tflite")
    ok, reason, _ = result["edgetpu"]
    assert not ok
    assert "libedgetpu.so.1" in reason and "not found" in reason
    assert result["xnnpack"] == (True, "", "XNNPACK")  # the chain still works...
    assert report.accelerator_usable is False  # ...but not on what the device is for
    assert report.exit_code == 1


def test_report_is_json_and_the_table_is_aligned(empty_root: Path) -> None:
    report = run_doctor("coral-usb", root=empty_root)
    data = json.loads(json.dumps(report.to_dict()))
    assert data["profile"] == "coral-usb"
    assert data["exit_code"] == report.exit_code
    assert data["required_accelerator"] == ["edgetpu"]
    tflite = next(f for f in data["formats"] if f["format"] == "tflite")
    assert [link["name"] for link in tflite["links"]] == ["edgetpu", "xnnpack"]
    assert tflite["links"][0]["options"] == {"device": "usb"}
    assert tflite["works"] is True
    assert data["memory"]["headroom_bytes"] == 256 * 2**20

    lines = format_report(report).splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("FORMAT"))
    header = lines[at]
    body = lines[at + 1 : lines.index("", at)]
    assert len(body) == 3  # onnx cpu, tflite edgetpu, tflite xnnpack
    for column in ("LINK", "RESULT", "DETAIL"):
        start = header.index(column)
        assert all(line[start - 2 : start] == "  " and line[start] != " " for line in body)
    # Numbers are right-aligned under their heading.
    end = header.index("LOAD ms") + len("LOAD ms")
    assert all(line[end - 1].isdigit() or line[end - 1] == "-" for line in body)


def test_memory_and_sensors_come_from_the_root(empty_root: Path) -> None:
    (empty_root / "proc").mkdir()
    (empty_root / "proc/meminfo").write_text("MemTotal:        8000000 kB\nMemFree: 1 kB\n")
    zone = empty_root / "sys/class/thermal/thermal_zone0"
    zone.mkdir(parents=True)
    (zone / "type").write_text("cpu-thermal\n")
    (zone / "temp").write_text("55500\n")
    report = run_doctor("raspberry-pi-5", root=empty_root)
    assert report.memory == {
        "total_bytes": 8_192_000_000,
        "limit_bytes": 4_096_000_000,
        "headroom_bytes": 256 * 2**20,
    }
    assert report.sensors["temperature_c"] == 55.5
    assert "55.5 °C" in format_report(report)


def test_unknown_profile_is_a_config_error(empty_root: Path) -> None:
    with pytest.raises(ConfigError, match="unknown device profile 'jetson-nano'"):
        run_doctor("jetson-nano", root=empty_root)


_WITHOUT_LITERT = textwrap.dedent(
    """
    import json, sys
    # As on a device where neither LiteRT nor tflite-runtime is installed.
    sys.modules["ai_edge_litert"] = None
    sys.modules["ai_edge_litert.interpreter"] = None
    sys.modules["tflite_runtime"] = None
    sys.modules["tflite_runtime.interpreter"] = None
    from pathlib import Path
    from agent.doctor import run_doctor, format_report
    report = run_doctor(sys.argv[1], root=Path(sys.argv[2]))
    format_report(report)
    print(json.dumps(report.to_dict()))
    """
)


@pytest.mark.parametrize(("profile", "exit_code"), [("generic-x86_64", 0), ("coral-usb", 1)])
def test_a_missing_runtime_is_reported_not_crashed_on(
    empty_root: Path, profile: str, exit_code: int
) -> None:
    done = subprocess.run(
        [sys.executable, "-c", _WITHOUT_LITERT, profile, str(empty_root)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    tflite = next(f for f in data["formats"] if f["format"] == "tflite")
    assert tflite["installed"] is False
    assert "no runtime for 'tflite' models is installed" in tflite["error"]
    assert all(not link["ok"] for link in tflite["links"])
    assert data["warnings"] == [f"tflite models cannot be served: {tflite['error']}"]
    # ONNX still works; the exit code depends on what the profile requires.
    onnx = next(f for f in data["formats"] if f["format"] == "onnx")
    assert onnx["works"] is True
    assert data["exit_code"] == exit_code
