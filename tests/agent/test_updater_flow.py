"""The update pipeline end to end, in-process: a real Agent, real signed metadata over real HTTP.

Each test starts an Agent (real onnxruntime, the in-memory broker) serving ``m`` v1
(``y = 2x``), publishes a candidate through a real image repository and director, and
checks where the update ends, what the device serves, what it reported, and what it kept.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.profiles import load_profile
from agent.profiles.schema import Memory
from agent.updater.machine import State
from tests.agent.agent_process import TEST_PROFILE
from tests.agent.updater_models import bundle, log_model, scale_model, slow_model
from tests.agent.updater_rig import DEVICE, Fault, Fleet, LiveAgent, output, sha256_of

X = [1.0, 2.0, 3.0, 4.0]
V1_Y = [2.0, 4.0, 6.0, 8.0]
V2_Y = [3.0, 6.0, 9.0, 12.0]

StartAgent = Callable[..., LiveAgent]


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet.create(tmp_path / "fleet")
    yield fleet
    fleet.http.close()


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    return scale_model(tmp_path / "v1" / "m.onnx", 2.0)


@pytest.fixture
def start_agent(tmp_path: Path, fleet: Fleet, v1: Path) -> Iterator[StartAgent]:
    started: list[LiveAgent] = []

    def start(**config: Any) -> LiveAgent:
        profile = config.pop("profile", None)
        live = LiveAgent.start(
            tmp_path / "state", {"m": v1}, fleet.update_config(**config), profile
        )
        started.append(live)
        return live

    yield start
    for live in started:
        live.close()


def reasons(live: LiveAgent) -> list[tuple[str, str | None]]:
    return [(e["state"], (e.get("reason") or {}).get("code")) for e in live.events]


def assert_serves_v1(live: LiveAgent) -> None:
    assert output(live.infer(X)) == V1_Y
    assert live.agent.slots["m"].status.state == "ready"


class Load:
    """Requests at a steady rate from a thread, until stopped."""

    def __init__(self, live: LiveAgent, values: list[float], per_s: float = 300.0) -> None:
        self.live, self.values, self.period = live, values, 1.0 / per_s
        self.sent: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.sent.append(self.live.request(self.values))
            next_at += self.period
            self._stop.wait(max(0.0, next_at - time.monotonic()))

    def stop(self) -> list[dict[str, Any]]:
        """Stop sending; every reply (AssertionError if one never came)."""
        self._stop.set()
        self._thread.join(5)
        self.live.wait_for(
            lambda: all(r in self.live.replies for r in self.sent), 10, "every reply"
        )
        return [self.live.replies[r] for r in self.sent]


# --- the happy path -----------------------------------------------------------------------


def test_update_commits_with_a_hot_swap_under_load(
    tmp_path: Path, fleet: Fleet, start_agent: StartAgent
) -> None:
    live = start_agent()
    v2 = scale_model(tmp_path / "v2" / "model.onnx", 3.0)
    target = fleet.publish("m", "2.0.0", v2)
    load = Load(live, X)
    time.sleep(0.2)
    fleet.assign(target)
    live.updater.check_now()
    live.wait_idle("committed")
    time.sleep(0.2)
    replies = load.stop()

    assert [r.get("error") for r in replies if "error" in r] == []
    outputs = [output(r) for r in replies]
    assert set(map(tuple, outputs)) == {tuple(V1_Y), tuple(V2_Y)}
    first_v2 = outputs.index(V2_Y)
    assert all(o == V2_Y for o in outputs[first_v2:]), "a request went back to v1 after the swap"
    assert live.states() == [
        "downloading",
        "verifying",
        "validating",
        "activating",
        "probation",
        "committed",
    ]
    event = live.events[-1]
    assert event["rollout_id"] == "r-1"
    assert (event["model"], event["to_version"]) == ("m", "2.0.0")
    assert event["from_version"] == f"sha256:{sha256_of(tmp_path / 'v1' / 'm.onnx')[:12]}"
    installed = live.updater.machine.data.installed["m"]
    assert (installed.version, installed.sha256) == ("2.0.0", target.hashes["sha256"])
    assert installed.path.read_bytes() == v2.read_bytes()
    assert installed.path.stat().st_mode & 0o222 == 0, "the stored artifact must be read-only"
    status = live.agent.status_document()["models"]["m"]
    assert (status["version"], status["state"]) == (
        f"sha256:{target.hashes['sha256'][:12]}",
        "ready",
    )


def test_the_desired_hint_wakes_the_updater_and_a_forged_one_installs_nothing(
    tmp_path: Path, fleet: Fleet, start_agent: StartAgent
) -> None:
    live = start_agent()
    fleet.publish("m", "6.6.6", scale_model(tmp_path / "evil" / "model.onnx", -1.0))
    live.client.publish(f"edge/{DEVICE}/desired", b'{"revision": 99}', qos=1, retain=True)
    live.wait_for(lambda: live.updater.checks == 2, 5, "a check woken by the hint")
    live.client.publish(f"edge/{DEVICE}/desired", b"not json", qos=1, retain=True)
    time.sleep(0.1)
    assert live.updater.checks == 2, "a malformed hint must not wake the updater"
    assert live.events == []  # the director names nothing for this device
    assert_serves_v1(live)

    fleet.assign(fleet.publish("m", "2.0.0", scale_model(tmp_path / "v2" / "model.onnx", 3.0)))
    live.client.publish(f"edge/{DEVICE}/desired", b'{"revision": 100}', qos=1, retain=True)
    live.wait_idle("committed")
    assert output(live.infer(X)) == V2_Y


def test_a_restart_serves_the_committed_version_and_keeps_n_old_versions(
    tmp_path: Path, fleet: Fleet, v1: Path
) -> None:
    state = tmp_path / "state"
    live = LiveAgent.start(state, {"m": v1}, fleet.update_config(keep_versions=1))
    try:
        shas = []
        for k in (3.0, 4.0, 5.0):
            target = fleet.publish(
                "m", f"{int(k)}.0.0", scale_model(tmp_path / f"v{k}" / "model.onnx", k)
            )
            shas.append(target.hashes["sha256"])
            fleet.assign(target)
            live.events.clear()
            live.updater.check_now()
            live.wait_idle("committed")
        assert output(live.infer(X)) == [5.0, 10.0, 15.0, 20.0]
        installed = live.updater.machine.data.installed["m"]
        assert installed.previous == [shas[1]]
        assert live.updater.store.artifacts() == sorted(shas[1:])  # 3.0.0 pruned
    finally:
        live.close()

    again = LiveAgent.start(state, {"m": v1}, fleet.update_config())
    try:
        assert output(again.infer(X)) == [5.0, 10.0, 15.0, 20.0]
        assert again.events == [], "an installed target must not be installed again"
    finally:
        again.close()
    # the operator points the config at another file: the config wins
    other = scale_model(tmp_path / "other" / "m.onnx", 7.0)
    fleet.http.assignments.clear()
    third = LiveAgent.start(state, {"m": other}, fleet.update_config())
    try:
        assert output(third.infer(X)) == [7.0, 14.0, 21.0, 28.0]
    finally:
        third.close()


# --- download faults ----------------------------------------------------------------------


def test_a_download_cut_midway_resumes_with_range(
    tmp_path: Path, fleet: Fleet, start_agent: StartAgent
) -> None:
    live = start_agent()
    v2 = scale_model(tmp_path / "v2" / "model.onnx", 3.0, pad_bytes=400_000)
    target = fleet.publish("m", "2.0.0", v2)
    sha = target.hashes["sha256"]
    half = target.length // 2
    fleet.http.faults[sha] = Fault(cut_after=half)
    fleet.assign(target)
    live.updater.check_now()
    live.wait_idle("committed")

    served = fleet.http.downloads(sha)
    assert [(s.range, s.status, s.sent) for s in served] == [
        (None, 200, half),
        (f"bytes={half}-", 206, target.length - half),
    ]
    assert output(live.infer(X)) == V2_Y


def test_an_artifact_that_would_fill_the_disk_is_refused_before_downloading(
    tmp_path: Path, fleet: Fleet, start_agent: StartAgent
) -> None:
    live = start_agent(min_free_disk_bytes=2**60)
    target = fleet.publish("m", "2.0.0", scale_model(tmp_path / "v2" / "model.onnx", 3.0))
    fleet.assign(target)
    live.updater.check_now()
    live.wait_idle("failed")

    assert reasons(live) == [("downloading", None), ("failed", "insufficient_disk")]
    assert "must stay free" in live.events[-1]["reason"]["message"]
    assert fleet.http.downloads(target.hashes["sha256"]) == []
    assert_serves_v1(live)
    assert target.hashes["sha256"] not in live.updater.machine.data.refused  # retried later


@pytest.mark.parametrize("attack", ["flipped_byte", "truncated", "oversized"])
def test_a_tampered_artifact_is_refused_and_the_old_model_keeps_serving(
    tmp_path: Path, fleet: Fleet, start_agent: StartAgent, attack: str
) -> None:
    live = start_agent()
    v2 = scale_model(tmp_path / "v2" / "model.onnx", 3.0)
    target = fleet.publish("m", "2.0.0", v2)
    data = v2.read_bytes()
    mid = len(data) // 2
    body = {
        "flipped_byte": data[:mid] + bytes([data[mid] ^ 1]) + data[mid + 1 :],
        "truncated": data[:-7],
        "oversized": data + b"\x00" * 7,
    }[attack]
    sha = target.hashes["sha256"]
    fleet.http.faults[sha] = Fault(body=body, times=1000)
    fleet.assign(target)
    load = Load(live, X, per_s=100)
    live.updater.check_now()
    live.wait_idle("failed")
    replies = load.stop()

    failed_in = "verifying" if attack == "flipped_byte" else "downloading"
    assert reasons(live)[-2:] == [(failed_in, None), ("failed", "target_mismatch")]
    assert all(output(r) == V1_Y for r in replies)
    assert_serves_v1(live)
    assert live.updater.store.artifacts() == []
    assert not live.updater.store.partial(sha).exists()


# --- validation and probation ---------------------------------------------------------------


def test_a_candidate_failing_its_golden_vectors_is_refused(
    tmp_path: Path, fleet: Fleet, start_agent: StartAgent
) -> None:
    live = start_agent()
    wrong = bundle(
        tmp_path / "m-2.0.0.tar.gz",
        scale_model(tmp_path / "v2" / "m.onnx", 3.0),
        "2.0.0",
        golden_x=X,
        golden_y=V1_Y,  # what v1 answers: v2 does not
    )
    target = fleet.publish("m", "2.0.0", wrong)
    fleet.assign(target)
    live.updater.check_now()
    live.wait_idle("failed")

    assert reasons(live)[-2:] == [("validating", None), ("failed", "golden_mismatch")]
    assert_serves_v1(live)
    refused = live.updater.machine.data.refused[target.hashes["sha256"]]
    assert (refused.code, refused.version) == ("golden_mismatch", "2.0.0")
    live.events.clear()
    live.updater.check_now()
    live.wait_for(lambda: live.updater.checks >= 3, 5, "another check")
    assert live.events == [], "a refused target must not be tried again"


def test_a_candidate_over_the_memory_headroom_is_refused(
    tmp_path: Path, fleet: Fleet, start_agent: StartAgent
) -> None:
    greedy = load_profile(TEST_PROFILE).model_copy(update={"memory": Memory(headroom_mib=2**30)})
    live = start_agent(profile=greedy)
    fleet.assign(fleet.publish("m", "2.0.0", scale_model(tmp_path / "v2" / "model.onnx", 3.0)))
    live.updater.check_now()
    live.wait_idle("failed")
    assert reasons(live)[-1] == ("failed", "insufficient_memory")
    assert_serves_v1(live)


def test_a_candidate_that_returns_nan_in_probation_is_rolled_back(
    tmp_path: Path, fleet: Fleet, start_agent: StartAgent
) -> None:
    live = start_agent(probation_s=10)
    nan_for_negatives = bundle(
        tmp_path / "m-2.0.0.tar.gz",
        log_model(tmp_path / "v2" / "m.onnx"),
        "2.0.0",
        golden_x=X,
        golden_y=[math.log(v) for v in X],
    )
    target = fleet.publish("m", "2.0.0", nan_for_negatives)
    load = Load(live, [-1.0, -2.0, -3.0, -4.0], per_s=200)
    time.sleep(0.2)
    fleet.assign(target)
    live.updater.check_now()
    live.wait_idle("rolled_back")
    replies = load.stop()

    assert reasons(live)[-2:] == [("probation", None), ("rolled_back", "error_rate_regression")]
    codes = {r["error"]["code"] for r in replies if "error" in r}
    assert codes == {"internal"}  # NaN answered as an error, never dropped
    assert output(live.infer([-1.0, -2.0, -3.0, -4.0])) == [-2.0, -4.0, -6.0, -8.0]
    assert live.updater.machine.data.installed == {}
    assert target.hashes["sha256"] in live.updater.machine.data.refused
    assert live.updater.store.artifacts() == []


def test_a_much_slower_candidate_is_rolled_back(
    tmp_path: Path, fleet: Fleet, start_agent: StartAgent
) -> None:
    live = start_agent(probation_s=10, probation_min_requests=20)
    # about 8 ms a request here, against well under 1 ms for v1; 60 requests/s keep the
    # queue short, so the breach is latency, not errors
    target = fleet.publish("m", "2.0.0", slow_model(tmp_path / "v2" / "model.onnx", 3.0, 1500))
    load = Load(live, X, per_s=60)
    time.sleep(0.6)  # a baseline of fast requests
    fleet.assign(target)
    live.updater.check_now()
    live.wait_idle("rolled_back")
    replies = load.stop()

    assert reasons(live)[-1] == ("rolled_back", "latency_regression")
    assert all("error" not in r for r in replies)
    assert_serves_v1(live)


def test_an_unreachable_server_changes_nothing(fleet: Fleet, start_agent: StartAgent) -> None:
    fleet.http.down = True
    live = start_agent()
    assert live.updater.last_check["error"]["code"] == "metadata_unavailable"
    assert live.events == []
    assert live.updater.machine.state is State.IDLE
    assert_serves_v1(live)
