"""Who decides what a device runs: pins over rollouts, the newer rollout over the older
(which is told so, per device), and two engines ticking at once (real SQLite and
PostgreSQL; device messages through the real ingest)."""

from __future__ import annotations

import threading
import time

from fleet_server.rollouts import operations
from fleet_server.store import assignments
from fleet_server.store.engine import Database
from tests.server.rollout_fleet import Fleet

FAST = {"dwell_s": 3600, "probation_s": 600}


def test_a_pin_overrides_rollouts(db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.2.0")
    fleet.release("1.3.0")
    fleet.devices(3)
    with db.write() as s:
        pin = operations.pin(s, "cam-00", "face", "1.2.0", actor="token:ops", now=fleet.clock())
    assert (pin.version, pin.variant) == ("1.2.0", "default")
    assert fleet.desired() == {"cam-00": ("1.2.0", None, 1)}
    ro = fleet.create(waves="100%", **FAST)
    engine = fleet.engine()
    fleet.tick(engine)
    assert fleet.row(ro.id, "cam-00").state == "pinned"
    assert fleet.row(ro.id, "cam-00").reason == {"code": "pinned", "message": "pinned to 1.2.0"}
    assert fleet.desired()["cam-00"] == ("1.2.0", None, 1)  # untouched by the rollout
    # pinned while the rollout holds it: the pin wins, the rollout lets go
    with db.write() as s:
        operations.pin(s, "cam-01", "face", "1.2.0", actor="token:ops", now=fleet.clock())
    assert fleet.desired()["cam-01"] == ("1.2.0", None, 2)
    fleet.update("cam-02", ro.id)
    report = fleet.tick(engine)
    assert fleet.row(ro.id, "cam-01").state == "pinned"
    assert report.ended == [(ro.id, "completed")]  # pinned devices do not hold a wave
    assert fleet.hints.last() == {"cam-00": 1, "cam-01": 2, "cam-02": 1}
    # unpinning changes nothing on the device; a later rollout updates it
    with db.write() as s:
        operations.unpin(s, "cam-00", "face", actor="token:ops", now=fleet.clock())
        assert assignments.pins_of(s, "cam-00") == []
    assert fleet.desired()["cam-00"] == ("1.2.0", None, 1)
    again = fleet.create(target={"devices": ["cam-00"]}, waves="100%", **FAST)
    fleet.tick(engine)
    assert fleet.desired()["cam-00"] == ("1.3.0", again.id, 2)
    assert [a for a in fleet.audit("device.pin") if a] == [
        {"model": "face", "version": "1.2.0", "variant": "default"}
    ] * 2


def test_the_newer_rollout_wins_and_the_older_is_told(db: Database) -> None:
    fleet = Fleet(db)
    for v in ("1.2.0", "1.3.0", "1.4.0"):
        fleet.release(v)
    fleet.devices(4)
    engine = fleet.engine()
    older = fleet.create(waves="100%", **FAST)
    fleet.tick(engine)
    newer = fleet.create(version="1.4.0", target={"devices": ["cam-00", "cam-01"]}, waves="100%")
    fleet.tick(engine)  # the newer assigns cam-00 and cam-01 ...
    assert fleet.desired()["cam-00"] == ("1.4.0", newer.id, 2)
    fleet.tick(engine)  # ... and the older sees it at its next step
    states = fleet.states(older.id)
    assert [states[d] for d in ("cam-00", "cam-01", "cam-02")] == [
        "superseded",
        "superseded",
        "assigned",
    ]
    assert fleet.row(older.id, "cam-00").reason == {
        "code": "superseded",
        "message": f"rollout {newer.id} assigned this device face",
    }
    # late events of the older rollout from a superseded device change nothing
    fleet.update("cam-00", older.id)
    fleet.tick(engine)
    assert fleet.row(older.id, "cam-00").state == "superseded"
    assert fleet.row(older.id, "cam-00").last_event == "committed"
    # the newer rollout's device rows remember what they took over
    row = fleet.row(newer.id, "cam-00")
    assert (row.prev_version, row.prev_rollout_id) == ("1.3.0", older.id)


def test_an_older_rollout_reaching_a_device_later_leaves_it_to_the_newer(db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.3.0")
    fleet.release("1.4.0")
    fleet.devices(2)
    engine = fleet.engine()
    older = fleet.create(waves="1,100%", **FAST)
    fleet.tick(engine)
    (canary,) = [d for d, s in fleet.states(older.id).items() if s == "assigned"]
    (other,) = {"cam-00", "cam-01"} - {canary}
    newer = fleet.create(version="1.4.0", target={"devices": [other]}, waves="100%")
    fleet.tick(engine)
    fleet.update(canary, older.id)
    report = fleet.tick(engine)  # the older starts its second wave: `other` is taken
    assert (older.id, 1) in report.waves_started
    assert fleet.row(older.id, other).state == "superseded"
    assert fleet.row(older.id, other).reason == {
        "code": "superseded",
        "message": f"the newer rollout {newer.id} holds this device's face",
    }
    assert fleet.desired()[other] == ("1.4.0", newer.id, 1)
    assert fleet.revision(other) == 1  # the older never touched it
    assert fleet.tick(engine).ended == [(older.id, "completed")]  # one wave move per tick


def test_two_engines_ticking_at_once_never_double_advance(db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.3.0")
    cams = fleet.devices(12)
    ro = fleet.create(waves="1,25%,50%,100%", **FAST)
    handles = [Database(db.url) for _ in range(2)]
    engines = [fleet.engine(db=h, batch_size=2) for h in handles]
    stop = threading.Event()
    errors: list[BaseException] = []
    ticks = [0, 0]

    def spin(i: int) -> None:
        while not stop.is_set():
            try:
                engines[i].tick()
                ticks[i] += 1
                time.sleep(0.003)  # a (very short) tick interval, as between replicas
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)
                return

    threads = [threading.Thread(target=spin, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    updated: set[str] = set()
    deadline = time.monotonic() + 30
    try:
        # Both engines must be in the race before devices answer: SQLite serialises
        # writers, so one engine can otherwise finish the rollout before the other ticks.
        while min(ticks) < 5 and time.monotonic() < deadline:
            time.sleep(0.005)
        while time.monotonic() < deadline:
            states = fleet.states(ro.id)
            if set(states.values()) == {"committed"}:
                break
            for d, state in states.items():
                if state == "assigned" and d not in updated:
                    fleet.update(d, ro.id)
                    updated.add(d)
            fleet.flush()
            time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(10)
        for h in handles:
            h.dispose()
    assert errors == [] and min(ticks) > 3
    assert set(fleet.states(ro.id).values()) == {"committed"}
    assert [a["wave"] for a in fleet.audit("rollout.wave_start", ro.id) if a] == [1, 2, 3, 4]
    assert len(fleet.audit("rollout.complete", ro.id)) <= 1
    # every device was assigned exactly once and hinted exactly once
    assert {d: fleet.revision(d) for d in cams} == dict.fromkeys(cams, 1)
    assert sorted(fleet.hints.sent) == sorted((d, 1) for d in cams)
