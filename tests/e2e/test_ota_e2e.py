"""OTA end to end with real processes (issue 5, "End to end"): ``edge-fleet serve`` on
SQLite, Mosquitto with the shipped mTLS config and ACL, and three ``edge-agent run``
processes enrolled with ``edge-agent enroll`` (tags ``site=berlin``, profile
``generic-x86_64`` from their config).

1. Release 1.0.0 is pushed with ``edge-fleet model push`` and rolled out to every device.
2. A canary rollout of 2.0.0 (``--waves 1,100%``) succeeds: every agent serves 2.0.0, by a
   real inference over MQTT and by its retained status, and the server shows it completed
   with every device committed. Requests sent all along are all answered, none fails.
3. A rollout of a bad 3.0.0 (NaN for the inputs the devices get in probation) auto-pauses:
   the canary rolls back by itself and reports ``rolled_back``, the failure gate
   (``--max-failure 50% --min-devices 1``) pauses the rollout with its reason, the director
   moves the canary back (``--auto-rollback``), and the other devices never see 3.0.0.

Updates arrive through the ``desired`` hint (the agents poll only every 2 minutes).
The tests share one fleet and run in this order.
"""

from __future__ import annotations

from collections import Counter

import pytest

from tests.e2e.conftest import DEVICES, GOLDEN_X, MODEL, E2EFleet
from tests.e2e.traffic import tensor_request

pytestmark = [pytest.mark.slow, pytest.mark.broker]

NEGATIVE_X = [-1.0, -2.0, -3.0, -4.0]


def outputs(reply: dict[str, object]) -> list[float]:
    assert "error" not in reply, reply
    return list(reply["outputs"][0]["data"])  # type: ignore[index]


def test_release_1_reaches_every_device(fleet: E2EFleet) -> None:
    assert outputs(fleet.infer(DEVICES[0])) == [0.5 * v for v in GOLDEN_X]
    fleet.release("1.0.0")
    rollout = fleet.rollout("1.0.0", "--waves", "100%", "--probation", "60s")
    done = fleet.wait_rollout(rollout, "completed", timeout=40)
    assert done["totals"] == {"committed": 3}
    fleet.wait_serving(DEVICES, "1.0.0")
    for device in DEVICES:
        reply = fleet.infer(device)
        assert reply["model_version"] == "1.0.0"
        assert outputs(reply) == GOLDEN_X


def test_canary_rollout_of_2_commits_everywhere(fleet: E2EFleet) -> None:
    watcher = fleet.rig.watcher
    assert watcher is not None
    fleet.release("2.0.0")
    load = fleet.traffic.load(DEVICES, MODEL, tensor_request(GOLDEN_X), per_s=30)
    rollout = fleet.rollout(
        "2.0.0", "--waves", "1,100%", "--probation", "60s",
        "--max-failure", "50%", "--min-devices", "1",
    )  # fmt: skip
    done = fleet.wait_rollout(rollout, "completed", timeout=60)
    outcomes = load.stop()

    assert done["totals"] == {"committed": 3}
    assert [w["size"] for w in done["waves_progress"]] == [1, 2]
    devices = fleet.rollout_devices(rollout)
    assert {d["state"] for d in devices.values()} == {"committed"}
    fleet.wait_serving(DEVICES, "2.0.0")
    for device in DEVICES:
        reply = fleet.infer(device)
        assert (reply["model_version"], outputs(reply)) == ("2.0.0", [2 * v for v in GOLDEN_X])
        states = [e.state for e in watcher.events(device) if e.to_version == "2.0.0"]
        assert states[-2:] == ["probation", "committed"], states
        server_view = fleet.rig.api(f"/devices/{device}")
        assert [(m["name"], m["version"]) for m in server_view["models"]] == [(MODEL, "2.0.0")]
    # the swap dropped nothing: every request answered, none failed, both versions served
    assert Counter(o.result for o in outcomes) == {"ok": len(outcomes)}
    assert {o.version for o in outcomes} == {"1.0.0", "2.0.0"}


def test_a_bad_release_auto_pauses_and_rolls_the_canary_back(fleet: E2EFleet) -> None:
    watcher = fleet.rig.watcher
    assert watcher is not None
    fleet.wait_serving(DEVICES, "2.0.0", timeout=5)
    fleet.release("3.0.0")  # passes the server's validation: its golden vector is positive
    load = fleet.traffic.load(DEVICES, MODEL, tensor_request(NEGATIVE_X), per_s=30)
    rollout = fleet.rollout(
        "3.0.0", "--waves", "1,100%", "--probation", "60s",
        "--max-failure", "50%", "--min-devices", "1", "--auto-rollback",
    )  # fmt: skip
    paused = fleet.wait_rollout(rollout, "paused", timeout=60)
    canary = next(d for d, row in fleet.rollout_devices(rollout).items() if row["wave"] == 1)
    fleet.wait_serving([canary], "2.0.0")
    outcomes = load.stop()

    # the canary rolled back by itself, and said why
    mine = [e for e in watcher.events(canary) if e.to_version == "3.0.0"]
    assert [e.state for e in mine][-2:] == ["probation", "rolled_back"]
    assert mine[-1].reason_code == "error_rate_regression"
    # the gate paused the rollout with its reason, and the director moved the canary back
    assert paused["reason"]["code"] == "failure_ratio"
    assert "wave 1 moved back (1 devices)" in paused["reason"]["message"]
    shown = fleet.rig.cli("rollout", "show", str(rollout))  # what the operator reads
    assert "m 3.0.0  paused" in shown and "wave 1 moved back" in shown, shown
    rows = fleet.rollout_devices(rollout)
    assert rows[canary]["state"] == "reverted"
    desired = fleet.rig.api(f"/devices/{canary}")["desired"]
    assert [(m["name"], m["version"]) for m in desired] == [(MODEL, "2.0.0")]
    # the others never received 3.0.0
    others = [d for d in DEVICES if d != canary]
    assert {rows[d]["state"] for d in others} == {"pending"}
    for device in others:
        assert not [e for e in watcher.events(device) if e.to_version == "3.0.0"]
        assert fleet.rig.api(f"/devices/{device}")["desired"][0]["version"] == "2.0.0"
    # every device serves 2.0.0; only the canary's probation answered NaN, as errors
    for device in DEVICES:
        assert fleet.infer(device)["model_version"] == "2.0.0"
    errors = Counter(o.device for o in outcomes if o.result != "ok")
    assert set(errors) == {canary}, errors
    assert {o.result for o in outcomes if o.result != "ok"} == {"internal"}
    assert fleet.infer(canary, NEGATIVE_X)["model_version"] == "2.0.0"
