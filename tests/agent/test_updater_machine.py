"""The update machine's table and persistence, the probation judge, the config, start-up paths."""

from __future__ import annotations

import json
import os
from collections import deque
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.config import AgentConfig
from agent.errors import UpdateError
from agent.telemetry.stats import ModelStats
from agent.updater.config import UpdateConfig
from agent.updater.installed import with_installed_models
from agent.updater.machine import (
    MAX_TRANSITIONS,
    REASON_STATES,
    TRANSITIONS,
    Installed,
    State,
    Trigger,
    UpdateMachine,
    UpdateRecord,
    UpdaterState,
    write_atomically,
)
from agent.updater.probation import Window, judge

SHA = "ab" * 32


def record(**changes: object) -> UpdateRecord:
    values: dict[str, object] = {
        "state": State.IDLE,
        "model": "m",
        "target_path": "models/m/2.0.0/cpu/model.onnx",
        "file": "model.onnx",
        "length": 10,
        "hashes": {"sha256": SHA},
        "format": "onnx",
        "to_version": "2.0.0",
        "from_version": "1.0.0",
    }
    return UpdateRecord.model_validate(values | changes)


# --- the table ---------------------------------------------------------------------------


def test_every_state_is_reachable_and_every_update_ends_idle() -> None:
    reachable, todo = {State.IDLE}, deque([State.IDLE])
    while todo:
        state = todo.popleft()
        for (src, _), dst in TRANSITIONS.items():
            if src is state and dst not in reachable:
                reachable.add(dst)
                todo.append(dst)
    assert reachable == set(State)
    for state in set(State) - {State.IDLE}:
        assert (state, Trigger.RESUME) in TRANSITIONS, f"{state} cannot be resumed"
        assert (state, Trigger.GIVE_UP) in TRANSITIONS, f"{state} has no way out of a crash loop"
        assert (state, Trigger.DONE) in TRANSITIONS
    assert {t for (s, t) in TRANSITIONS if s is State.IDLE} == {Trigger.START, Trigger.FAIL}


def test_a_restart_while_the_new_model_may_serve_rolls_back() -> None:
    for state in (State.ACTIVATING, State.PROBATION):
        assert TRANSITIONS[state, Trigger.RESUME] is State.ROLLED_BACK
        assert TRANSITIONS[state, Trigger.FAIL] is State.ROLLED_BACK
    for state in (State.DOWNLOADING, State.VERIFYING, State.VALIDATING):
        assert TRANSITIONS[state, Trigger.RESUME] is state
        assert TRANSITIONS[state, Trigger.FAIL] is State.FAILED
    assert {TRANSITIONS[s, Trigger.DONE] for s in REASON_STATES | {State.COMMITTED}} == {State.IDLE}


# --- persistence ---------------------------------------------------------------------------


def test_each_transition_is_on_disk_before_it_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "updates" / "state.json"
    seen: list[tuple[str, str]] = []

    def listener(rec: UpdateRecord) -> None:
        on_disk = UpdaterState.model_validate_json(path.read_bytes())
        assert on_disk.update == rec
        seen.append((rec.state.value, on_disk.state.value))

    machine = UpdateMachine(path, listener)
    machine.start(record())
    for _ in range(4):
        machine.fire(Trigger.DONE)
    installed = Installed(
        version="2.0.0", sha256=SHA, path=tmp_path / "m.onnx", target_path="models/m/2.0.0/cpu/m"
    )
    machine.fire(Trigger.DONE, installed=installed)  # PROBATION -> COMMITTED
    machine.fire(Trigger.DONE)  # COMMITTED -> IDLE, not reported

    assert [s for s, _ in seen] == [
        "downloading", "verifying", "validating", "activating", "probation", "committed"
    ]  # fmt: skip
    assert all(reported == stored for reported, stored in seen)
    final = UpdaterState.model_validate_json(path.read_bytes())
    assert final.update is None and final.installed["m"] == installed
    assert sorted(p.name for p in path.parent.iterdir()) == ["state.json"]  # no temp files


def test_an_illegal_transition_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    machine = UpdateMachine(tmp_path / "state.json")
    machine.start(record())
    with pytest.raises(UpdateError, match="no transition from downloading on start"):
        machine.fire(Trigger.START)
    with pytest.raises(UpdateError, match="in progress"):
        machine.start(record())
    assert UpdateMachine(tmp_path / "state.json").state is State.DOWNLOADING


def test_a_failure_keeps_its_reason_across_restarts_and_refuses_the_target(
    tmp_path: Path,
) -> None:
    machine = UpdateMachine(tmp_path / "state.json")
    machine.start(record())
    machine.fire(Trigger.DONE)
    machine.fire(Trigger.DONE)  # VALIDATING
    machine.fire(Trigger.FAIL, UpdateError("golden off", code="golden_mismatch"), refuse=True)

    again = UpdateMachine(tmp_path / "state.json")
    again.fire(Trigger.RESUME, UpdateError("restarted", code="agent_restarted"))
    assert again.update is not None
    assert again.update.reason is not None and again.update.reason.code == "golden_mismatch"
    assert again.update.resumes == 1
    assert again.data.refused[SHA].code == "golden_mismatch"


def test_a_loop_is_cut_off(tmp_path: Path) -> None:
    machine = UpdateMachine(tmp_path / "state.json")
    machine.start(record(transitions=MAX_TRANSITIONS))
    assert machine.state is State.FAILED
    assert machine.update is not None and machine.update.reason is not None
    assert machine.update.reason.code == "state_loop"


def test_an_interrupted_write_leaves_the_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "state.json"
    write_atomically(path, b"old")

    def power_cut(*_args: object) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "replace", power_cut)
    with pytest.raises(OSError):
        write_atomically(path, b"new")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_corrupt_state_file_is_moved_aside(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text('{"update": {"state": "exploding"}}')
    machine = UpdateMachine(path)
    assert machine.state is State.IDLE
    assert (tmp_path / "state.json.corrupt").exists()


# --- start-up: which file is loaded -----------------------------------------------------------


def test_committed_updates_replace_the_configured_path_unless_the_operator_changed_it(
    tmp_path: Path,
) -> None:
    stored = tmp_path / "store" / "m2.onnx"
    stored.parent.mkdir()
    stored.write_bytes(b"model")
    state = UpdaterState(
        installed={
            "m": Installed(
                version="2",
                sha256=SHA,
                path=stored,
                target_path="t",
                config_path=tmp_path / "m.onnx",
            ),
            "gone": Installed(version="2", sha256=SHA, path=tmp_path / "missing", target_path="t"),
        }
    )
    (tmp_path / "updates").mkdir()
    (tmp_path / "updates" / "state.json").write_text(state.model_dump_json())

    def config(m_path: str) -> AgentConfig:
        return AgentConfig.model_validate(
            {
                "device_id": "d",
                "state_dir": str(tmp_path),
                "mqtt": {"url": "mqtt://127.0.0.1:1"},
                "models": [{"name": "m", "path": m_path}, {"name": "gone", "path": "/x/g.onnx"}],
            }
        )

    paths = {m.name: m.path for m in with_installed_models(config(str(tmp_path / "m.onnx"))).models}
    assert paths == {"m": stored, "gone": Path("/x/g.onnx")}
    changed = with_installed_models(config("/elsewhere/m.onnx"))
    assert changed.models[0].path == Path("/elsewhere/m.onnx")


# --- probation -------------------------------------------------------------------------------


def config(**values: object) -> UpdateConfig:
    base: dict[str, object] = {
        "server_url": "https://fleet.test",
        "image_root_file": "/r/image.json",
        "director_root_file": "/r/director.json",
        "probation_min_requests": 20,
    }
    return UpdateConfig.model_validate(base | values)


def windows(
    old: tuple[int, int, float], new: tuple[int, int, float], extra_codes: int = 0
) -> tuple[Window, Window]:
    """Baseline and probation windows from real counters: (ok, errors, latency ms) each."""
    stats = ModelStats("m")
    for _ in range(50):  # before the baseline began: not counted
        stats.record_error("internal")
    start = stats.snapshot()
    for ok, errors, ms in (old, new):
        for _ in range(ok):
            stats.record_ok(ms)
        for _ in range(errors):
            stats.record_error("internal")
        for _ in range(extra_codes):
            stats.record_error("model_not_ready")
        if (ok, errors, ms) == old:
            swap = stats.snapshot()
    return Window.between(start, swap), Window.between(swap, stats.snapshot())


def test_probation_compares_error_rates() -> None:
    baseline, current = windows((95, 5, 1.0), (90, 10, 1.0))
    assert (baseline.requests, baseline.error_rate) == (100, 0.05)
    assert current.error_rate == 0.10
    assert judge(baseline, current, config(max_error_rate_increase=0.05)) is None  # 10% <= 10%
    breach = judge(baseline, current, config(max_error_rate_increase=0.04))
    assert breach is not None and breach.code == "error_rate_regression"
    assert "10.0% over 100 requests, against 5.0% before" in breach.message


def test_probation_compares_latency_p95() -> None:
    baseline, current = windows((100, 0, 1.0), (100, 0, 2.5))
    assert baseline.p95_ms == pytest.approx(1.0, rel=0.02)
    assert current.p95_ms == pytest.approx(2.5, rel=0.02)
    assert judge(baseline, current, config(max_latency_ratio=3.0)) is None
    breach = judge(baseline, current, config(max_latency_ratio=2.0, min_latency_regression_ms=1.0))
    assert breach is not None and breach.code == "latency_regression"
    # 2.5x slower, but only 1.5 ms: under the default 2 ms noise floor of fast models.
    assert judge(baseline, current, config(max_latency_ratio=2.0)) is None


def test_probation_does_not_judge_too_few_requests_or_errors_the_model_cannot_cause() -> None:
    baseline, current = windows((100, 0, 1.0), (0, 19, 1.0))
    assert judge(baseline, current, config()) is None  # 19 < 20 requests
    baseline, current = windows((100, 0, 1.0), (100, 0, 1.0), extra_codes=30)
    assert current.errors == 0 and judge(baseline, current, config()) is None


# --- config ------------------------------------------------------------------------------------


def test_the_config_is_strict() -> None:
    assert config().artifacts_url == "https://fleet.test/tuf/image/targets/"
    assert config(poll_interval_s=300).poll_interval_s == 300
    with pytest.raises(ValidationError, match="extra"):
        config(poll_intervall_s=10)
    with pytest.raises(ValidationError, match="go together"):
        config(cert_file="/c.pem")
    with pytest.raises(ValidationError, match="http"):
        config(server_url="ftp://fleet")
    assert json.loads(config().model_dump_json())["keep_versions"] == 2
