"""Profile detection inside the emulated aarch64 process: the arch and the onnxruntime
providers are the emulated process's own; the device trees are the fakes of the native tests.

One emulated ``python -c`` detects every tree (an emulated start costs seconds).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.agent.fixtures.fake_machine import FAKE_HARDWARE, FakeMachine
from tests.arm64.emulator import Emulator

pytestmark = [pytest.mark.arm64, pytest.mark.slow]

DETECT = """
import json, sys
from pathlib import Path
from agent.profiles import detect_profile
roots = json.loads(sys.argv[1])
print(json.dumps({label: detect_profile(Path(root)).to_dict() for label, root in roots.items()}))
"""

#: The aarch64 boards of the native fakes (each names the profile it must be detected as).
ARM_BOARDS = sorted(name for name, (arch, _, _) in FAKE_HARDWARE.items() if arch == "aarch64")


def test_detection_under_emulation(emulator: Emulator, tmp_path: Path) -> None:
    roots = {"/": "/"}  # what the emulated agent itself sees: the root's fake ARM cpuinfo
    for name in ARM_BOARDS:
        FAKE_HARDWARE[name][2](FakeMachine(tmp_path / name))
        (tmp_path / name).mkdir(exist_ok=True)  # "generic-arm64" has no files at all
        roots[name] = str(tmp_path / name)
    found = json.loads(emulator.python(DETECT, json.dumps(roots)))
    assert {label: d["arch"] for label, d in found.items()} == dict.fromkeys(roots, "aarch64")
    picked = {label: d["profile"] for label, d in found.items()}
    assert picked == {"/": "generic-arm64", **{name: name for name in ARM_BOARDS}}
    assert {"raspberry-pi-5", "jetson-orin"} <= set(ARM_BOARDS)
    assert "tegra234" in found["jetson-orin"]["reason"]
    assert "Raspberry Pi 5" in found["raspberry-pi-5"]["reason"]
    assert found["/"]["matched"] == []
