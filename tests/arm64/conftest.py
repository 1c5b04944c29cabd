"""Fixtures of the arm64 tests: the emulated Python, and ONE emulated ``edge-agent run``.

Emulation is far slower than native, so the agent starts once per session and every test asks
it something, over the session's real Mosquitto. Its models: ``tests/arm64/emulated_agent.py``.
The config names no profile, so the agent detects one, on what the emulated process sees.
Its ``updates:`` section points at ``arm64_fleet``, a real fleet HTTP server with signed TUF
metadata (``tests/agent/updater_rig.py``) that assigns nothing until a test says so.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.agent.agent_process import AgentProcess, wait_settled, write_config
from tests.agent.daemon_client import MqttClient
from tests.agent.updater_rig import Fleet
from tests.arm64.emulated_agent import (
    DEVICE,
    READY_TIMEOUT_S,
    TELEMETRY_INTERVAL_S,
    EmulatedAgent,
    arm64_models,
    update_section,
)
from tests.arm64.emulator import Arm64Unavailable, Emulator, build_root, stage_source
from tests.broker import Mosquitto


@pytest.fixture(scope="session")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Emulator:
    """The aarch64 python3.11 of scripts/arm64-env (skips where it cannot be built)."""
    try:
        root = build_root()
    except Arm64Unavailable as exc:
        pytest.skip(f"no arm64 environment on this machine: {exc}")
    return Emulator(root, stage_source(tmp_path_factory.mktemp("arm64-src")))


@pytest.fixture(scope="session")
def arm64_fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """The emulated agent's fleet server: real keys, signed metadata, artifacts over HTTP."""
    fleet = Fleet.create(tmp_path_factory.mktemp("arm64-fleet"))
    yield fleet
    fleet.http.close()


@pytest.fixture(scope="session")
def emulated_agent(
    emulator: Emulator,
    mosquitto: Mosquitto,
    arm64_fleet: Fleet,
    models_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[EmulatedAgent]:
    """``edge-agent run`` as an aarch64 process under qemu, started once for the session."""
    folder = tmp_path_factory.mktemp("arm64-agent")
    models = arm64_models(folder / "models", models_dir)
    config = write_config(
        folder / "agent.yaml",
        url=f"mqtt://127.0.0.1:{mosquitto.port}",
        state_dir=folder / "state",
        models=[{"name": name, "path": path} for name, path in models.items()],
        device_id=DEVICE,
        profile=None,  # detected by the emulated process
        telemetry={"interval_s": TELEMETRY_INTERVAL_S},
        updates=update_section(arm64_fleet),
    )
    log_path = folder / "agent.log"
    watcher = MqttClient(mosquitto.port)
    t0 = time.monotonic()
    with log_path.open("wb") as log:
        proc = emulator.popen(
            ["-m", "agent.cli", "run", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    agent = AgentProcess(proc, config, log_path)
    try:
        status = wait_settled(watcher, agent, DEVICE, list(models), READY_TIMEOUT_S)
        ready_s = time.monotonic() - t0
        print(f"\narm64: the emulated agent was ready {ready_s:.1f} s after its start")
        yield EmulatedAgent(agent, models, ready_s, status)
        assert agent.stop(timeout=60) == 0, agent.log()[-4000:]
        agent.assert_clean_log()
    finally:
        watcher.close()
        if agent.alive:
            agent.kill()


@pytest.fixture(scope="session")
def arm64_client(mosquitto: Mosquitto, emulated_agent: EmulatedAgent) -> Iterator[MqttClient]:
    """An MQTT 5 client of the emulated agent's broker."""
    client = MqttClient(mosquitto.port)
    yield client
    client.close()
