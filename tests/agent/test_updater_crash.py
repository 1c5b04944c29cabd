"""The crash table: kill the agent in every state of the update machine, restart, check the truth.

Each case runs a real ``edge-agent run`` process (real MQTT to a real Mosquitto, real
onnxruntime, the ``updates`` section in its config) against a real HTTP fleet server with real
signed metadata. The first run exits with 137 right after persisting its entry into the
state under test (``EDGE_AGENT_CRASH_AT``, the test hook); the next run must resume or roll
back as the table says. Then the test checks, from the outside:

* the model the device serves (an inference over MQTT: ``y = 2x`` is v1, ``y = 3x`` v2);
* the persisted state (``updates/state.json``): idle, and the installed version;
* the ``update`` events the fleet received across both runs (QoS 1 from the outbox, so an
  event queued before the crash arrives after the restart).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.updater.machine import UpdaterState
from tests.agent.agent_process import AgentProcess, wait_settled, write_config
from tests.agent.daemon_client import MqttClient
from tests.agent.updater_models import bundle, scale_model
from tests.agent.updater_rig import Fleet
from tests.broker import Mosquitto

pytestmark = [pytest.mark.broker, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
X = [1.0, 2.0, 3.0, 4.0]
V1 = [2.0, 4.0, 6.0, 8.0]
V2 = [3.0, 6.0, 9.0, 12.0]
ALL = ["downloading", "verifying", "validating", "activating", "probation"]
COMMITTED = [*ALL, "committed"]


@dataclass(frozen=True)
class Case:
    """One row of the crash table."""

    crash_at: tuple[str, ...]  # the state each crashing run dies in, in order
    serves: list[float]  # what the device answers for X after the last restart
    events: list[str]  # the update states the fleet saw (consecutive repeats folded)
    reason: str | None = None  # the reason code of the last event
    bad_candidate: bool = False  # v2 fails its golden vectors
    max_resumes: int = 3


TABLE = {
    "downloading": Case(("downloading",), V2, COMMITTED),
    "verifying": Case(("verifying",), V2, COMMITTED),
    "validating": Case(("validating",), V2, COMMITTED),
    "activating": Case(("activating",), V1, [*ALL[:3], "rolled_back"], "agent_restarted"),
    # the event of the state a run dies in is never sent: it is persisted, then the crash
    "probation": Case(("probation",), V1, [*ALL[:4], "rolled_back"], "agent_restarted"),
    "committed": Case(("committed",), V2, COMMITTED),
    "idle": Case(("idle",), V2, COMMITTED),
    "failed": Case(("failed",), V1, [*ALL[:3], "failed"], "golden_mismatch", bad_candidate=True),
    "rolled_back": Case(
        ("probation", "rolled_back"), V1, [*ALL[:4], "rolled_back"], "agent_restarted"
    ),
    "crash_loop": Case(("downloading", "downloading"), V1, ["failed"], "crash_loop", max_resumes=1),
}


class Device:
    """One device: its config files, its processes, and the fleet's view of it."""

    def __init__(
        self, tmp: Path, fleet: Fleet, broker: Mosquitto, name: str, case: Case, **updates: Any
    ) -> None:
        self.tmp, self.name = tmp, name
        v1 = scale_model(tmp / "v1" / "m.onnx", 2.0)
        config = fleet.update_config(probation_s=0.3, max_resumes=case.max_resumes, **updates)
        self.config = write_config(
            tmp / "agent.yaml",
            url=broker.url,
            state_dir=tmp / "state",
            models=[{"name": "m", "path": v1}],
            device_id=name,
            updates=json.loads(config.model_dump_json()),
        )
        self.client = MqttClient(broker.port)
        self.client.subscribe(f"edge/{name}/update")
        self.events: list[dict[str, Any]] = []
        self.runs = 0

    def run(self, crash_at: str | None) -> AgentProcess:
        env = {k: v for k, v in os.environ.items() if k != "EDGE_AGENT_CRASH_AT"}
        if crash_at is not None:
            env["EDGE_AGENT_CRASH_AT"] = crash_at
        self.runs += 1
        log = self.tmp / f"run{self.runs}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "--config", str(self.config)],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return AgentProcess(proc, self.config, log)

    def state(self) -> UpdaterState:
        path = self.tmp / "state" / "updates" / "state.json"
        return UpdaterState.model_validate_json(path.read_bytes())

    def collect(self, until: str, timeout: float = 30.0) -> None:
        """Read update events until one in state ``until``."""
        deadline = time.monotonic() + timeout
        topic = f"edge/{self.name}/update"
        while not self.events or self.events[-1]["state"] != until:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no {until!r} event; got {self.folded()}")
            self.events.append(self.client.expect(topic, left).json())

    def folded(self) -> list[str]:
        """The states reported, in order, without re-sends.

        Delivery is at least once: a process killed during an outbox flush sends again,
        after the restart, the events it had not yet deleted (byte-identical, with their
        original ``ts``). Those are dropped here (the server ignores them: a device's state in
        a rollout never moves backwards); then repeats
        of one state (each start reports the state it found) fold into one.
        """
        seen: set[tuple[str, str]] = set()
        states = []
        for e in self.events:
            key = (e["ts"], e["state"])
            if key not in seen:
                seen.add(key)
                states.append(e["state"])
        return [s for i, s in enumerate(states) if i == 0 or states[i - 1] != s]

    def infer(self) -> list[float]:
        reply_to = self.client.new_reply_topic()
        self.client.subscribe(reply_to)
        body = {
            "id": "q",
            "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": X}],
        }
        self.client.publish(
            f"edge/{self.name}/infer/m", json.dumps(body).encode(), response_topic=reply_to
        )
        return [float(v) for v in self.client.expect(reply_to).response().outputs[0].array.ravel()]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet.create(tmp_path / "fleet")
    yield fleet
    fleet.http.close()


@pytest.mark.parametrize("name", list(TABLE))
def test_crash_in_every_state(
    tmp_path: Path, fleet: Fleet, mosquitto: Mosquitto, name: str
) -> None:
    case = TABLE[name]
    device = Device(tmp_path, fleet, mosquitto, f"crash-{name.replace('_', '-')}", case)
    v2 = scale_model(tmp_path / "v2" / "m.onnx", 3.0)
    artifact = bundle(
        tmp_path / "m-2.0.0.tar.gz",
        v2,
        "2.0.0",
        golden_x=X,
        golden_y=V1 if case.bad_candidate else V2,
    )
    target = fleet.publish("m", "2.0.0", artifact)
    fleet.assign(target, device=device.name)

    for crash_at in case.crash_at:
        agent = device.run(crash_at)
        try:
            code = agent.proc.wait(60)
        except subprocess.TimeoutExpired:
            agent.kill()
            raise AssertionError(f"no crash at {crash_at}:\n{agent.log()}") from None
        assert code == 137, f"exit {code}, not the crash at {crash_at}:\n{agent.log()}"
        persisted = device.state()
        assert persisted.state.value == crash_at or (
            crash_at == "idle" and persisted.update is None
        )

    agent = device.run(None)
    try:
        device.collect(case.events[-1])
        wait_settled(device.client, agent, device.name, ["m"])
        deadline = time.monotonic() + 10
        while device.state().update is not None:
            assert time.monotonic() < deadline, f"the update did not finish:\n{agent.log()}"
            time.sleep(0.05)
        assert device.infer() == case.serves
        assert device.folded() == case.events
        last = device.events[-1]
        assert (last.get("reason") or {}).get("code") == case.reason
        assert {(e["model"], e["to_version"], e["rollout_id"]) for e in device.events} == {
            ("m", "2.0.0", "r-1")
        }
        final = device.state()
        installed = final.installed.get("m")
        if case.serves == V2:
            assert installed is not None and installed.sha256 == target.hashes["sha256"]
        else:
            assert installed is None
            assert final.refused[target.hashes["sha256"]].code == case.reason
        assert agent.stop() == 0
        agent.assert_clean_log()
    finally:
        agent.kill()
        device.client.close()


def test_sigkill_in_the_middle_of_a_download_resumes_it(
    tmp_path: Path, fleet: Fleet, mosquitto: Mosquitto
) -> None:
    case = Case((), V2, COMMITTED)
    device = Device(
        tmp_path, fleet, mosquitto, "crash-mid-download", case, bandwidth_limit_bytes_per_s=400_000
    )
    v2 = scale_model(tmp_path / "v2" / "m.onnx", 3.0, pad_bytes=1_200_000)
    target = fleet.publish("m", "2.0.0", v2)
    sha = target.hashes["sha256"]
    fleet.assign(target, device=device.name)
    partial = tmp_path / "state" / "updates" / "incoming" / f"{sha}.part"

    agent = device.run(None)
    deadline = time.monotonic() + 30
    while not (partial.exists() and partial.stat().st_size > 300_000):
        assert time.monotonic() < deadline and agent.alive, f"no download:\n{agent.log()}"
        time.sleep(0.02)
    agent.kill()  # SIGKILL
    have = partial.stat().st_size
    assert have < target.length
    assert device.state().state.value == "downloading"

    agent = device.run(None)
    try:
        device.collect("committed")
        assert device.infer() == V2
        served = fleet.http.downloads(sha)
        assert served[0].range is None
        assert served[-1].range == f"bytes={have}-" and served[-1].status == 206
        assert device.folded() == COMMITTED
        assert agent.stop() == 0
    finally:
        agent.kill()
        device.client.close()
