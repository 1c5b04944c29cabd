"""``edge-fleet rollout ...`` and ``device pin`` against the API on a real socket
(uvicorn), with the engine ticking and devices reporting through the real ingest."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from fleet_server.api import create_app
from fleet_server.cli import main
from fleet_server.cli_rollout_view import bar, render
from fleet_server.domain import Role
from fleet_server.server import build_services
from fleet_server.store.engine import Database
from tests.server.conftest import make_token, settings_for
from tests.server.rollout_fleet import Fleet
from tests.server.test_cli import free_port


@pytest.fixture
def fleet(sqlite_db: Database, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Fleet]:
    """A fleet of 5 devices, releases 1.2.0 and 1.3.0, the API on a socket, the CLI
    pointed at it with an operator token."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    svc = build_services(settings_for(tmp_path / "data", sqlite_db.url), db=sqlite_db)
    port = free_port()
    config = uvicorn.Config(create_app(svc), host="127.0.0.1", port=port, log_level="warning")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    monkeypatch.setenv("EDGE_FLEET_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("EDGE_FLEET_TOKEN", make_token(sqlite_db, Role.OPERATOR))
    f = Fleet(sqlite_db)
    f.release("1.2.0")
    f.release("1.3.0")
    f.devices(5)
    yield f
    srv.should_exit = True
    thread.join(5)


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_create_watch_and_complete(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(
        capsys, "rollout", "create", "--model", "face@1.3.0", "--target", "site=berlin",
        "--waves", "1,50%,100%", "--max-failure", "5%", "--min-devices", "3",
        "--probation", "10m", "--auto-rollback",
    )  # fmt: skip
    assert code == 0
    assert out.splitlines() == [
        "rollout 1: face 1.3.0 to 5 devices",
        "waves: 1, 2, 2; watch it with: edge-fleet rollout show 1 --watch",
    ]
    code, out, _ = run(capsys, "rollout", "show", "1")
    lines = out.splitlines()
    assert lines[0] == "rollout 1  face 1.3.0  running  not started"
    assert lines[2] == "waves    1,50%,100% -> 1, 2, 2 devices; probation 10m; auto-rollback on"
    assert lines[-1].split()[:3] == ["all", "5", "5"]  # all pending

    engine = fleet.engine()
    done = threading.Event()

    def drive() -> None:  # the server loop and the devices, while the CLI watches
        reported: set[str] = set()
        while not done.is_set():
            fleet.tick(engine)
            for device, state in fleet.states(1).items():
                if state == "assigned" and device not in reported:
                    fleet.update(device, 1)
                    reported.add(device)
            time.sleep(0.02)

    driver = threading.Thread(target=drive)
    driver.start()
    try:
        code, out, _ = run(capsys, "rollout", "show", "1", "--watch", "--interval", "0.05")
    finally:
        done.set()
        driver.join(10)
    assert code == 0
    frames = ["rollout 1  face" + f for f in out.split("rollout 1  face")[1:]]
    assert len(frames) > 2 and "running" in frames[0]
    last = frames[-1].splitlines()
    assert last[0].startswith("rollout 1  face 1.3.0  completed  wave 3 of 3")
    assert last[3] == "reason   completed: 5 committed"
    assert last[-1].split() == [
        "all",
        "5",
        "0",
        "0",
        "0",
        "0",
        "5",
        "0",
        "0",
        "[" + "#" * 20 + "]",
        "100%",
    ]

    code, out, _ = run(capsys, "rollout", "list")
    assert out.splitlines()[1].split() == [
        "1", "face", "1.3.0", "completed", "3/3", "5/5", "0", "0s", "ago",
    ]  # fmt: skip
    code, out, _ = run(capsys, "rollout", "devices", "1", "--wave", "1")
    assert out.splitlines()[1].split()[1:4] == ["1", "committed", "committed"]


def test_operator_verbs_and_pins(fleet: Fleet, capsys: pytest.CaptureFixture[str]) -> None:
    run(capsys, "rollout", "create", "--model", "face@1.3.0", "--target", "site=berlin")
    assert (
        run(capsys, "rollout", "pause", "1")[1]
        == "rollout 1: paused (paused by token:operator#1)\n"
    )
    code, _, err = run(capsys, "rollout", "pause", "1")
    assert code == 1 and err == "error: invalid_transition: cannot pause a rollout that is paused\n"
    assert run(capsys, "rollout", "resume", "1", "--force")[1] == "rollout 1: running\n"
    assert (
        run(capsys, "rollout", "abort", "1")[1]
        == "rollout 1: aborted (aborted by token:operator#1)\n"
    )
    out = run(capsys, "rollout", "rollback", "1")[1]
    assert out.startswith("rollout 1: rolling_back (rollback requested by")
    code, _, err = run(capsys, "rollout", "show", "9")
    assert code == 1 and err == "error: not_found: no rollout 9\n"
    code, _, err = run(capsys, "rollout", "create", "--model", "face", "--target", "a=b")
    assert code == 1 and err.startswith("error: bad_model: 'face': expected MODEL@VERSION")

    code, out, _ = run(capsys, "device", "pin", "cam-00", "face@1.2.0")
    assert code == 0 and out == "cam-00: pinned to face 1.2.0 (default)\n"
    assert fleet.desired()["cam-00"] == ("1.2.0", None, 1)
    out = run(capsys, "device", "pins", "cam-00")[1]
    assert out.splitlines()[1].split()[:4] == ["face", "1.2.0", "default", "token:operator#1"]
    out = run(capsys, "device", "unpin", "cam-00", "face")[1]
    assert out == "cam-00: face unpinned (it keeps 1.2.0 until a rollout)\n"
    code, _, err = run(capsys, "device", "unpin", "cam-00", "face")
    assert code == 1 and err == "error: not_found: cam-00 has no pin for face\n"


def test_the_progress_view_renders_waves_and_bars() -> None:
    assert bar({"committed": 5}, 10) == "[##########..........]  50%"
    assert bar({"committed": 1, "failed": 1, "superseded": 1, "pending": 1}, 4) == (
        "[#####xxxxx-----.....]  75%"
    )
    assert bar({}, 0) == "[                    ]    -"
    r = {
        "id": 7, "model": "face", "version": "1.3.0", "state": "paused", "current_wave": 1,
        "wave_sizes": [1, 2], "waves": ["1", "100%"], "dwell_s": 1800, "probation_s": 600,
        "auto_rollback": False, "wave_started_at": None, "target": {"tags": {"site": "b"}},
        "reason": {"code": "failure_ratio", "message": "failure gate: wave 2: 2 of 2 failed"},
        "health": [{"gate": "failure", "breached": True, "code": "failure_ratio",
                    "message": "wave 2: 2 of 2 failed"}],
        "waves_progress": [
            {"wave": 1, "size": 1, "counts": {"committed": 1}},
            {"wave": 2, "size": 2, "counts": {"failed": 1, "stalled": 1}},
        ],
        "totals": {"committed": 1, "failed": 1, "stalled": 1, "skipped": 2},
    }  # fmt: skip
    assert render(r).splitlines() == [
        "rollout 7  face 1.3.0  paused  wave 2 of 2",
        "target   site=b",
        "waves    1,100% -> 1, 2 devices; probation 10m; auto-rollback off",
        "reason   failure_ratio: failure gate: wave 2: 2 of 2 failed",
        "gate     failure BREACHED: wave 2: 2 of 2 failed",
        "",
        "WAVE  SIZE  PENDING  ASSIGNED  UPDATING  PROBATION  COMMITTED  FAILED  OTHER  PROGRESS",
        "1     1     0        0         0         0          1          0       0      [####################] 100%",  # noqa: E501
        "2*    2     0        0         0         0          0          2       0      [xxxxxxxxxxxxxxxxxxxx] 100%",  # noqa: E501
        "all   3     0        0         0         0          1          2       0      [#######xxxxxxxxxxxxx] 100%",  # noqa: E501
        "skipped: 2 devices no variant fits (rollout devices 7 --wave 0)",
    ]
