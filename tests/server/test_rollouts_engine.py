"""The rollout reconciler on real SQLite and PostgreSQL, driven by device messages fed
through the real ingest: waves, dwell, gates, auto-rollback, stalls, restarts."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import func, select

from fleet_server.errors import Conflict
from fleet_server.rollouts import operations
from fleet_server.store.engine import Database
from fleet_server.store.models import UpdateEventRow
from tests.server.rollout_fleet import Fleet

FAST = {"dwell_s": 3600, "probation_s": 600}


def test_waves_advance_when_their_devices_commit(db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.2.0")
    fleet.release("1.3.0")
    cams = fleet.devices(5)
    ro = fleet.create(waves="1,50%,100%", **FAST)
    assert ro.wave_sizes == [1, 2, 2] and ro.current_wave == -1
    engine = fleet.engine()

    report = fleet.tick(engine)
    assert report.waves_started == [(ro.id, 0)] and report.assigned == 1
    states = fleet.states(ro.id)
    (canary,) = [d for d, s in states.items() if s == "assigned"]
    assert sorted(s for d, s in states.items() if d != canary) == ["pending"] * 4
    assert fleet.desired() == {canary: ("1.3.0", ro.id, 1)}
    assert fleet.revision(canary) == 1 and fleet.hints.last() == {canary: 1}

    fleet.update(canary, ro.id, outcome="probation")
    assert fleet.tick(engine).waves_started == []  # on probation: not done yet
    assert fleet.states(ro.id)[canary] == "probation"
    fleet.event(canary, ro.id, "committed")
    assert fleet.tick(engine).waves_started == [(ro.id, 1)]
    wave2 = [d for d, s in fleet.states(ro.id).items() if s == "assigned"]
    assert len(wave2) == 2

    for d in wave2:
        fleet.update(d, ro.id)
    fleet.tick(engine)
    rest = [d for d, s in fleet.states(ro.id).items() if s == "assigned"]
    assert len(rest) == 2
    for d in rest:
        fleet.update(d, ro.id)
    report = fleet.tick(engine)
    assert report.ended == [(ro.id, "completed")]
    assert set(fleet.states(ro.id).values()) == {"committed"}
    assert {d: v[0] for d, v in fleet.desired().items()} == dict.fromkeys(cams, "1.3.0")
    assert fleet.hints.last() == dict.fromkeys(cams, 1)  # one change each, one hint each
    assert [a["wave"] for a in fleet.audit("rollout.wave_start", ro.id) if a] == [1, 2, 3]
    (done,) = fleet.audit("rollout.complete", ro.id)
    assert done is not None and done["reason"]["message"] == "5 committed"
    assert fleet.tick(engine).rollouts == 0  # completed and settled: left alone


def test_a_wave_moves_on_after_its_dwell_and_offline_devices_catch_up(db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.2.0")
    fleet.release("1.3.0")
    fleet.device("cam-off", online=False)  # enrolled, never online
    fleet.devices(2)
    ro = fleet.create(waves="2,100%", dwell_s=600, probation_s=600)
    engine = fleet.engine()
    fleet.tick(engine)
    states = fleet.states(ro.id)
    assert states["cam-off"] == "pending"  # online devices lead
    first = sorted(d for d, s in states.items() if s == "assigned")
    assert first == ["cam-00", "cam-01"]
    fleet.update("cam-00", ro.id)
    fleet.tick(engine)
    fleet.clock.advance(seconds=599)
    assert fleet.tick(engine).waves_started == []  # cam-01 is silent, dwell not over
    fleet.clock.advance(seconds=2)
    assert fleet.tick(engine).waves_started == [(ro.id, 1)]
    # the offline device is assigned all the same: the director names the new version
    assert fleet.desired()["cam-off"] == ("1.3.0", ro.id, 1)
    fleet.clock.advance(seconds=601)
    assert fleet.tick(engine).ended == [(ro.id, "completed")]
    assert fleet.states(ro.id)["cam-off"] == "assigned"
    # it comes back, finds the metadata, updates: the ended rollout still follows it
    fleet.status("cam-off")
    fleet.update("cam-off", ro.id)
    fleet.update("cam-01", ro.id)
    report = fleet.tick(engine)
    assert report.rollouts == 1
    assert fleet.states(ro.id) == dict.fromkeys(["cam-00", "cam-01", "cam-off"], "committed")
    assert fleet.tick(engine).rollouts == 0  # settled now


def test_the_failure_gate_pauses_at_the_right_count(db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.3.0")
    cams = fleet.devices(8)
    gates = {"failure": {"max_ratio": 0.25, "min_devices": 4}}
    ro = fleet.create(waves="100%", gates=gates, **FAST)
    engine = fleet.engine()
    fleet.tick(engine)
    fleet.update(cams[0], ro.id, outcome="failed")
    fleet.update(cams[1], ro.id)
    fleet.update(cams[2], ro.id)
    assert fleet.tick(engine).paused == []  # 1 of 3: below the minimum sample
    fleet.update(cams[3], ro.id)
    assert fleet.tick(engine).paused == []  # 1 of 4 = 25 %: not above 25 %
    fleet.update(cams[4], ro.id, outcome="rolled_back", code="probation_latency")
    (paused,) = fleet.tick(engine).paused
    assert paused[1].code == "failure_ratio"
    with db.read() as s:
        from fleet_server.store.rollouts import get_rollout

        view = get_rollout(s, ro.id)
    assert view.state == "paused" and view.reason is not None
    assert view.reason.message == "failure gate: wave 1: 2 of 5 decided devices failed (40% > 25%)"
    assert fleet.row(ro.id, cams[4]).reason == {
        "code": "probation_latency",
        "message": f"probation_latency on {cams[4]}",
    }
    # paused: nothing new happens, device events are still followed
    fleet.update(cams[5], ro.id)
    assert fleet.tick(engine).paused == []
    assert fleet.states(ro.id)[cams[5]] == "committed"
    # a plain resume re-judges: still 2 of 6 failed, so it pauses again
    with db.write() as s:
        operations.resume(s, ro.id, actor="token:ops", now=fleet.clock())
    assert len(fleet.tick(engine).paused) == 1
    with db.write() as s, pytest.raises(Conflict) as err:
        operations.pause(s, ro.id, actor="token:ops", now=fleet.clock())
    assert err.value.code == "invalid_transition"
    # resume --force waives the failures so far; the rollout carries on
    with db.write() as s:
        operations.resume(s, ro.id, actor="token:ops", now=fleet.clock(), force=True)
    assert fleet.tick(engine).paused == []
    for d in cams[6:]:
        fleet.update(d, ro.id)
    assert fleet.tick(engine).ended == [(ro.id, "completed")]


def test_auto_rollback_moves_the_wave_back_and_bumps_revisions(db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.2.0")
    fleet.release("1.3.0")
    fleet.release("1.4.0")
    cams = fleet.devices(6)
    engine = fleet.engine()
    old = fleet.create(waves="100%", **FAST)  # everyone to 1.3.0 first
    fleet.tick(engine)
    for d in cams:
        fleet.update(d, old.id)
        fleet.status(d, running="1.3.0")
    fleet.tick(engine)
    fleet.status("cam-05", running="1.2.0")  # one device reports the old version anyway
    gates = {"failure": {"max_ratio": 0.0, "min_devices": 2}}
    ro = fleet.create(version="1.4.0", waves="3,100%", gates=gates, auto_rollback=True, **FAST)
    fleet.tick(engine)
    wave1 = sorted(d for d, s in fleet.states(ro.id).items() if s == "assigned")
    assert len(wave1) == 3 and all(fleet.revision(d) == 2 for d in wave1)
    fleet.update(wave1[0], ro.id, to="1.4.0")
    fleet.update(wave1[1], ro.id, to="1.4.0", outcome="failed")
    (paused,) = fleet.tick(engine).paused
    assert paused[1].code == "failure_ratio"
    desired = fleet.desired()
    for d in wave1:  # back to what the director named before, rollout and all
        assert desired[d] == ("1.3.0", old.id, 3)
        assert fleet.revision(d) == 3 and fleet.hints.last()[d] == 3
        assert fleet.row(ro.id, d).state == "reverted"
    for d in set(cams) - set(wave1):  # the next wave was never assigned
        assert desired[d] == ("1.3.0", old.id, 1) and fleet.states(ro.id)[d] == "pending"
    (entry,) = fleet.audit("rollout.gate_breach", ro.id)
    assert entry is not None and entry["state"] == "paused"
    assert "wave 1 moved back (3 devices)" in entry["reason"]["message"]
    # the first rollout had finished (settled): its history stays as it was
    assert set(fleet.states(old.id).values()) == {"committed"}


def test_a_rollback_restores_every_device_in_batches(db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.2.0")
    fleet.release("1.3.0")
    cams = fleet.devices(5)
    fleet.device("cam-new", running=None)  # runs no face model yet
    fleet.flush()
    ro = fleet.create(waves="4,100%", **FAST)
    engine = fleet.engine(batch_size=3)
    fleet.tick(engine)
    fleet.tick(engine)  # a batch of 3 per tick: the first wave's 4 took two ticks
    assigned = [d for d, s in fleet.states(ro.id).items() if s == "assigned"]
    assert len(assigned) == 4
    with db.write() as s:
        operations.rollback(s, ro.id, actor="token:ops", now=fleet.clock())
    assert fleet.tick(engine).reverted == 3
    report = fleet.tick(engine)
    assert report.reverted == 1 and report.ended == [(ro.id, "rolled_back")]
    states = fleet.states(ro.id)
    assert sorted(states.values()) == ["cancelled"] * 2 + ["reverted"] * 4
    desired = fleet.desired()
    for d in assigned:
        if d == "cam-new":
            assert d not in desired  # nothing before: the director names nothing again
        else:
            assert desired[d] == ("1.2.0", None, 2)  # the reported version, no rollout
    assert len(cams) == 5


def test_a_device_silent_in_probation_stalls_and_counts_as_failed(db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.3.0")
    cams = fleet.devices(2)
    gates = {"failure": {"max_ratio": 0.4, "min_devices": 2}}
    ro = fleet.create(waves="100%", gates=gates, dwell_s=3600, probation_s=300)
    engine = fleet.engine()
    fleet.tick(engine)
    fleet.update(cams[0], ro.id)
    fleet.update(cams[1], ro.id, outcome="probation")
    fleet.clock.advance(seconds=301)
    (paused,) = fleet.tick(engine).paused
    assert fleet.row(ro.id, cams[1]).state == "stalled"
    assert "1 of 2" in paused[1].message
    fleet.event(cams[1], ro.id, "committed")  # a late verdict still counts
    fleet.tick(engine)
    assert fleet.row(ro.id, cams[1]).state == "committed"


def test_a_restarted_engine_continues_the_rollout(db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.3.0")
    fleet.devices(3)
    ro = fleet.create(waves="1,100%", **FAST)
    fleet.tick(fleet.engine())
    (canary,) = [d for d, s in fleet.states(ro.id).items() if s == "assigned"]
    fleet.update(canary, ro.id)
    fleet.flush()
    # "restart": a new database handle and a new engine over the same database
    db2 = Database(db.url)
    try:
        engine2 = fleet.engine(db=db2)
        assert engine2.tick().waves_started == [(ro.id, 1)]
        for d in fleet.states(ro.id):
            if d != canary:
                fleet.update(d, ro.id)
        assert fleet.tick(engine2).ended == [(ro.id, "completed")]
        assert [a["wave"] for a in fleet.audit("rollout.wave_start", ro.id) if a] == [1, 2]
    finally:
        db2.dispose()


def test_the_latency_gate_compares_telemetry_before_and_after_the_swap(db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.3.0")
    cams = fleet.devices(3)
    gates = {"failure": None, "latency": {"max_regression": 0.5, "min_devices": 3, "window_s": 600}}
    ro = fleet.create(waves="100%", gates=gates, **FAST)
    engine = fleet.engine()
    fleet.tick(engine)
    t0 = fleet.clock()
    for i, d in enumerate(cams):  # the old version's baseline: p95 10 ms
        for seq, back in enumerate((300, 200, 100), start=1):
            fleet.telemetry(d, seq, 10.0, at=t0 - timedelta(seconds=back + i))
    fleet.clock.advance(seconds=10)
    after = {"cam-00": 12.0, "cam-01": 30.0, "cam-02": 40.0}  # +20 %, +200 %, +300 %
    for d in cams[:2]:
        fleet.update(d, ro.id, outcome="probation")
        fleet.telemetry(d, 4, after[d], at=fleet.clock() + timedelta(seconds=60))
    assert fleet.tick(engine).paused == []  # 2 devices: below the minimum of 3
    fleet.update("cam-02", ro.id, outcome="probation")
    fleet.telemetry("cam-02", 4, after["cam-02"], at=fleet.clock() + timedelta(seconds=60))
    (paused,) = fleet.tick(engine).paused
    assert paused[1].code == "latency_regression"
    assert paused[1].message == "median latency p95 change +200% on 3 devices (> +50%)"
    activated = fleet.row(ro.id, "cam-00").activated_ts
    assert activated == int(fleet.clock().timestamp())


def test_an_event_committed_below_the_watermark_is_still_applied(db: Database) -> None:
    """Ticks read only devices with events above the rollout's watermark; an event whose
    id is lower but committed later (PostgreSQL sequences, several ingest replicas) is
    noticed by the count and applied by a full pass."""
    fleet = Fleet(db)
    fleet.release("1.2.0")
    fleet.release("1.3.0")
    fleet.devices(3)
    ro = fleet.create(waves="100%", **FAST)
    engine = fleet.engine()
    fleet.tick(engine)
    first, second, third = sorted(fleet.states(ro.id))
    fleet.update(first, ro.id)
    fleet.tick(engine)
    assert fleet.states(ro.id)[first] == "committed"
    watermark = fleet.row_of_rollout(ro.id).events_watermark
    assert watermark > 0

    fleet.update(second, ro.id)  # the normal path: only `second` is read
    fleet.tick(engine)
    assert fleet.states(ro.id)[second] == "committed"

    # `third`'s whole update lands with ids below the watermark, as a late commit would.
    fleet.update(third, ro.id)
    fleet.flush()
    with db.write() as s:
        newest = s.scalar(select(func.max(UpdateEventRow.id)))
        rows = s.scalars(select(UpdateEventRow).where(UpdateEventRow.device_id == third)).all()
        for i, ev in enumerate(sorted(rows, key=lambda e: e.id)):
            ev.id = -(len(rows) - i)  # below every id the watermark has passed
        s.flush()
        assert newest is not None
    report = fleet.tick(engine)
    assert fleet.states(ro.id)[third] == "committed"
    assert report.ended == [(ro.id, "completed")]
