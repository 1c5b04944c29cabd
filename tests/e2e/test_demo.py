"""The one-command demo end to end: ``scripts/demo.py --once`` (what ``scripts/demo`` runs
after ``scripts/setup --demo``) against real processes, under a time limit, and nothing of
it left running afterwards; with Mosquitto, and with the amqtt fallback (MQTT 3.1.1) that
the demo uses where Mosquitto cannot be installed."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.slow, pytest.mark.broker]


def processes_mentioning(text: str) -> list[str]:
    """Command lines of live processes that contain ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if text in cmd:
                found.append(cmd)
    return found


@pytest.mark.parametrize("broker", ["auto", "amqtt"])
def test_the_demo_runs_a_canary_rollout_and_leaves_nothing_running(broker: str) -> None:
    if broker == "amqtt" and importlib.util.find_spec("amqtt") is None:
        if os.environ.get("CI"):  # the dev extra installs it: missing in CI is a failure
            pytest.fail("amqtt is not installed (scripts/setup --tests installs the dev extra)")
        pytest.skip("amqtt is not installed")
    demo = [sys.executable, str(REPO / "scripts" / "demo.py"), "--once", "--broker", broker]
    done = subprocess.run(demo, capture_output=True, text=True, timeout=240, check=False)
    out = done.stdout
    assert done.returncode == 0, f"{out[-4000:]}\n{done.stderr[-4000:]}"
    if broker == "amqtt":  # the agents, the server and the client all speak MQTT 3.1.1
        assert re.search(r"broker: amqtt on mqtt://127\.0\.0\.1:\d+ \(MQTT 3\.1\.1", out), out
        assert "--mqtt 3.1.1" in out

    work = re.search(r"\(in (/\S+edge-fleet-demo-\w+)\)", out)
    assert work is not None, out
    assert processes_mentioning(work.group(1)) == []
    assert "nothing left running" in out
    assert re.search(r"dashboard\s+http://127\.0\.0\.1:\d+/", out)
    assert re.search(r"login token\s+eft_\S+", out)
    # three enrolled agents; the simulated Jetson falls back to the CPU and says so
    for device, profile, state in [
        ("cam-x86", "generic-x86_64", "online"),
        ("cam-pi5", "raspberry-pi-5", "online"),
        ("cam-orin", "jetson-orin", "degraded"),
    ]:
        assert re.search(rf"{device}\s+{profile}\s+{state}\s+", out), out
    # v1 everywhere, then the canary rollout of v2 went through both waves
    assert "rollout 1: completed, wave 1 of 1: 3 committed" in out
    assert "rollout 2: running, wave 1 of 2" in out
    assert "rollout 2: completed, wave 2 of 2: 3 committed" in out
    # real answers over MQTT, served by v2
    assert re.search(r"'hello world' upside down .* 180° \(\S+\)\s+\[text-direction 2\.0\.0", out)
    assert re.search(r"JPEG photo \(astronaut\) .* face 0\.\d+ at \[", out), out
    assert "error unknown_model" in out
