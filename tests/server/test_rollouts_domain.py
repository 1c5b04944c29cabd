"""The rollout vocabulary without a database: transition tables, waves, the spec, the
variant choice and the gates' arithmetic."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pydantic
import pytest

from fleet_server.domain import ArtifactKind, ModelRelease, Variant
from fleet_server.errors import Conflict
from fleet_server.rollouts.domain import (
    DEVICE_TRANSITIONS,
    EVENT_STATES,
    HOLDING,
    OPEN,
    TRANSITIONS,
    Action,
    DeviceState,
    FailureGate,
    Gates,
    LatencyGate,
    RolloutSpec,
    RolloutState,
    RolloutView,
    Target,
    device_may_move,
    next_state,
)
from fleet_server.rollouts.gates import GateContext, LatencyPairs, Outcomes, evaluate
from fleet_server.rollouts.planner import choose_variant
from fleet_server.rollouts.waves import parse_waves, split, wave_sizes

S, A = RolloutState, Action
NOW = datetime(2025, 1, 1, tzinfo=UTC)


def test_the_rollout_transition_table() -> None:
    expected = {
        (S.RUNNING, A.PAUSE): S.PAUSED,
        (S.RUNNING, A.GATE_BREACH): S.PAUSED,
        (S.RUNNING, A.COMPLETE): S.COMPLETED,
        (S.RUNNING, A.ABORT): S.ABORTED,
        (S.RUNNING, A.ROLLBACK): S.ROLLING_BACK,
        (S.PAUSED, A.RESUME): S.RUNNING,
        (S.PAUSED, A.ABORT): S.ABORTED,
        (S.PAUSED, A.ROLLBACK): S.ROLLING_BACK,
        (S.COMPLETED, A.ROLLBACK): S.ROLLING_BACK,
        (S.ABORTED, A.ROLLBACK): S.ROLLING_BACK,
        (S.ROLLING_BACK, A.REVERTED): S.ROLLED_BACK,
    }
    assert expected == TRANSITIONS
    for state in RolloutState:
        for action in Action:
            if (state, action) in expected:
                assert next_state(state, action) is expected[(state, action)]
            else:
                with pytest.raises(Conflict) as err:
                    next_state(state, action)
                assert err.value.code == "invalid_transition"
                assert err.value.message == f"cannot {action} a rollout that is {state}"
    # rolled_back is the only state nothing leaves
    assert {s for s, _ in TRANSITIONS} == set(RolloutState) - {S.ROLLED_BACK}


def test_the_device_transition_table() -> None:
    d = DeviceState
    assert set(DEVICE_TRANSITIONS) == set(DeviceState)
    final = {d.SUPERSEDED, d.PINNED, d.REVERTED, d.CANCELLED, d.SKIPPED}
    assert {s for s, nxt in DEVICE_TRANSITIONS.items() if not nxt} == final
    assert not any(device_may_move(s, s) for s in DeviceState)  # no self-loops
    # only a pending device is assigned or cancelled; only one on probation stalls
    assert {s for s in DeviceState if device_may_move(s, d.ASSIGNED)} == {d.PENDING}
    assert {s for s in DeviceState if device_may_move(s, d.CANCELLED)} == {d.PENDING}
    assert {s for s in DeviceState if device_may_move(s, d.STALLED)} == {d.PROBATION}
    # a device holding the assignment can always be moved back or taken over
    for s in HOLDING:
        assert {d.REVERTED, d.SUPERSEDED, d.PINNED} <= DEVICE_TRANSITIONS[s]
    assert not device_may_move(d.PENDING, d.REVERTED)
    assert set(EVENT_STATES.values()) <= HOLDING and d.PENDING in OPEN


def test_waves_are_cumulative_and_cover_every_device() -> None:
    waves = parse_waves("1, 10%,50%,100%")
    assert [str(w) for w in waves] == ["1", "10%", "50%", "100%"]
    assert wave_sizes(waves, 40) == [1, 3, 16, 20]
    assert wave_sizes(waves, 5) == [1, 2, 2]  # 10 % of 5 adds nobody after the canary
    assert wave_sizes(waves, 1) == [1]
    assert wave_sizes(parse_waves("100%"), 7) == [7]
    assert wave_sizes(parse_waves("33.3%,100%"), 10) == [4, 6]
    assert split(list("abcde"), [1, 2, 2]) == [["a"], ["b", "c"], ["d", "e"]]
    for bad, says in [
        ("1,10%", "last wave must be 100%"),
        ("50%,10%,100%", "at least as far"),
        ("0,100%", "0 devices"),
        ("1,ten,100%", "'ten' is neither"),
        ("150%", "not in (0%, 100%]"),
        ("", "at least one"),
    ]:
        with pytest.raises(ValueError, match=says.replace("(", r"\(").replace(")", r"\)")):
            parse_waves(bad)


def _spec(**kw: Any) -> RolloutSpec:
    base: dict[str, Any] = {"model": "face", "version": "1.3.0", "target": {"tags": {"a": "b"}}}
    return RolloutSpec.model_validate(base | kw)


def test_the_spec_refuses_what_cannot_be_meant() -> None:
    spec = _spec(waves="1,100%")
    assert spec.waves == ["1", "100%"] and spec.gates.failure == FailureGate()
    assert spec.gates.latency is None and spec.auto_rollback is False
    for kw, says in [
        ({"version": "latest"}, "semantic version"),
        ({"target": {}}, "all_devices"),
        ({"target": {"all_devices": True, "profile": "x"}}, "cannot be combined"),
        ({"target": {"devices": ["bad id"]}}, "bad device id"),
        ({"waves": "1,50%"}, "100%"),
        ({"variants": {"rpi": "a b"}}, "bad variant"),
        ({"gates": {"failure": {"max_ratio": 1.5}}}, "less than 1"),
        ({"surprise": 1}, "Extra inputs"),
    ]:
        with pytest.raises(pydantic.ValidationError, match=says):
            _spec(**kw)
    assert Target(all_devices=True).all_devices


def _release(*variants: tuple[str, list[str]]) -> ModelRelease:
    return ModelRelease(
        id=1,
        name="face",
        version="1.3.0",
        created_at=NOW,
        created_by="t",
        variants=tuple(
            Variant(
                name,
                ArtifactKind.BUNDLE,
                "onnx",
                "0" * 64,
                1,
                "f.tgz",
                {"compatible_profiles": profiles},
                NOW,
                "t",
            )
            for name, profiles in variants
        ),
    )


def test_the_variant_is_chosen_per_profile() -> None:
    r = _release(("default", ["rpi"]), ("int8", ["rpi", "orin"]), ("fp16", ["orin", "x86"]))
    assert choose_variant(r, "rpi", {}) == ("default", "")
    assert choose_variant(r, "x86", {}) == ("fp16", "")
    assert choose_variant(r, "orin", {}) == (
        None,
        "several variants fit profile orin (int8, fp16); choose one",
    )
    assert choose_variant(r, "orin", {"orin": "fp16"}) == ("fp16", "")
    assert choose_variant(r, "orin", {"*": "int8"}) == ("int8", "")
    assert choose_variant(r, "x86", {"*": "int8"}) == (
        None,
        "variant int8 is not built for profile x86",
    )
    assert choose_variant(r, "coral", {}) == (None, "no variant of face 1.3.0 is built for coral")
    assert choose_variant(r, None, {}) == (None, "the device has not reported its profile")


def _ctx(wave: Outcomes, overall: Outcomes, pairs: LatencyPairs | None = None) -> GateContext:
    view = RolloutView.model_validate(
        _spec().model_dump()
        | {
            "id": 1,
            "wave_sizes": [1],
            "state": "running",
            "reason": None,
            "current_wave": 1,
            "wave_started_at": None,
            "created_at": NOW,
            "created_by": "t",
            "updated_at": NOW,
            "finished_at": None,
        }
    )
    return GateContext(view, 1, wave, overall, lambda _spec: list(pairs or []))


def test_the_gates_arithmetic() -> None:
    gates = Gates(
        failure=FailureGate(max_ratio=0.1, min_devices=3),
        latency=LatencyGate(max_regression=0.25, min_devices=2),
    )
    (f, lat) = evaluate(gates, _ctx(Outcomes(2, 2), Outcomes(2, 2)))
    assert (f.breached, f.code) == (False, "sample_too_small")
    assert f.message == "rollout: 2 of 2 decided devices failed (judged from 3)"
    assert (lat.breached, lat.code) == (False, "sample_too_small")
    # a canary too small alone is judged with the rollout so far
    (f, _) = evaluate(gates, _ctx(Outcomes(1, 1), Outcomes(4, 1)))
    assert f.breached and f.message == "rollout: 1 of 4 decided devices failed (25% > 10%)"
    # a late wave is judged alone: earlier successes do not dilute it
    (f, _) = evaluate(gates, _ctx(Outcomes(5, 1), Outcomes(100, 1)))
    assert f.breached and f.message.startswith("wave 2: 1 of 5")
    (f, _) = evaluate(gates, _ctx(Outcomes(10, 1), Outcomes(10, 1)))
    assert not f.breached and f.message == "wave 2: 1 of 10 decided devices failed (10%)"
    pairs = [("a", 10.0, 12.0), ("b", 10.0, 13.0), ("c", 10.0, 30.0)]
    (_, lat) = evaluate(gates, _ctx(Outcomes(), Outcomes(), pairs))
    assert lat.breached and lat.message == "median latency p95 change +30% on 3 devices (> +25%)"
    (_, lat) = evaluate(gates, _ctx(Outcomes(), Outcomes(), pairs[:2]))
    assert not lat.breached and lat.message == "median latency p95 change +25% on 2 devices"
    assert evaluate(Gates(failure=None), _ctx(Outcomes(9, 9), Outcomes(9, 9))) == []
