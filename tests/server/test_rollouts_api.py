"""The rollout and pin routes through a real ASGI client on real databases: roles, the
progress view, the operator's verbs and the audit trail."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet_server.api import create_app
from fleet_server.domain import Role
from fleet_server.server import build_services
from fleet_server.store.engine import Database
from tests.server.conftest import make_token, settings_for
from tests.server.rollout_fleet import Fleet


class Api:
    def __init__(self, db: Database, tmp_path: Path) -> None:
        svc = build_services(settings_for(tmp_path / "data", db.url), db=db)
        self.client = TestClient(create_app(svc))
        self.tokens = {role: make_token(db, role) for role in Role}

    def call(self, method: str, path: str, role: Role = Role.OPERATOR, **kw: Any) -> Any:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"}
        return self.client.request(method, path, headers=headers, **kw)


@pytest.fixture
def api(db: Database, tmp_path: Path) -> Iterator[Api]:
    a = Api(db, tmp_path)
    yield a
    a.client.close()


def _err(response: Any) -> tuple[int, str]:
    return response.status_code, response.json()["error"]["code"]


def test_create_show_and_drive_a_rollout(api: Api, db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.2.0")
    fleet.release("1.3.0", profiles=("raspberry-pi-5",))
    fleet.devices(4)
    fleet.device("orin-1", profile="jetson-orin")
    fleet.flush()
    body = {
        "model": "face",
        "version": "1.3.0",
        "target": {"tags": {"site": "berlin"}},
        "waves": "1,100%",
        "gates": {"failure": {"max_ratio": 0.05, "min_devices": 3}},
    }
    assert _err(api.call("POST", "/api/v1/rollouts", Role.VIEWER, json=body)) == (403, "forbidden")
    r = api.call("POST", "/api/v1/rollouts", json=body)
    assert r.status_code == 201, r.text
    ro = r.json()
    assert (ro["state"], ro["current_wave"], ro["wave_sizes"]) == ("running", -1, [1, 3])
    assert ro["totals"] == {"pending": 4, "skipped": 1} and ro["devices"] == 5
    assert [w["counts"] for w in ro["waves_progress"]] == [{"pending": 1}, {"pending": 3}]

    engine = fleet.engine()
    fleet.tick(engine)
    ro = api.call("GET", f"/api/v1/rollouts/{ro['id']}", Role.VIEWER).json()
    assert ro["current_wave"] == 0 and ro["waves_progress"][0]["counts"] == {"assigned": 1}
    (health,) = ro["health"]
    assert health == {
        "gate": "failure",
        "breached": False,
        "code": "sample_too_small",
        "message": "rollout: 0 of 0 decided devices failed (judged from 3)",
    }
    devices = api.call("GET", f"/api/v1/rollouts/{ro['id']}/devices?wave=0", Role.VIEWER).json()
    (skipped,) = devices["items"]
    assert (skipped["device_id"], skipped["state"]) == ("orin-1", "skipped")
    assert skipped["reason"]["message"] == "no variant of face 1.3.0 is built for jetson-orin"
    page = api.call("GET", f"/api/v1/rollouts/{ro['id']}/devices?limit=2", Role.VIEWER).json()
    assert len(page["items"]) == 2 and page["next_cursor"]

    rid = ro["id"]
    paused = api.call("POST", f"/api/v1/rollouts/{rid}/pause").json()
    assert paused["state"] == "paused" and paused["reason"]["code"] == "paused"
    assert _err(api.call("POST", f"/api/v1/rollouts/{rid}/pause")) == (409, "invalid_transition")
    resumed = api.call("POST", f"/api/v1/rollouts/{rid}/resume", json={"force": True}).json()
    assert resumed["state"] == "running" and resumed["reason"] is None
    assert api.call("POST", f"/api/v1/rollouts/{rid}/abort").json()["state"] == "aborted"
    back = api.call("POST", f"/api/v1/rollouts/{rid}/rollback").json()
    assert back["state"] == "rolling_back" and back["totals"]["cancelled"] == 3
    fleet.tick(engine)
    assert api.call("GET", f"/api/v1/rollouts/{rid}", Role.VIEWER).json()["state"] == "rolled_back"
    listed = api.call("GET", "/api/v1/rollouts?state=rolled_back", Role.VIEWER).json()
    assert [r["id"] for r in listed["items"]] == [rid]
    assert api.call("GET", "/api/v1/rollouts?model=other", Role.VIEWER).json()["items"] == []

    audit = api.call("GET", f"/api/v1/audit?target_type=rollout&target_id={rid}").json()
    assert [(e["action"], e["actor"].split(":")[0]) for e in reversed(audit["items"])] == [
        ("rollout.create", "token"),
        ("rollout.wave_start", "rollout-engine"),
        ("rollout.pause", "token"),
        ("rollout.resume", "token"),
        ("rollout.abort", "token"),
        ("rollout.rollback", "token"),
        ("rollout.reverted", "rollout-engine"),
    ]


def test_create_refuses_what_it_cannot_plan(api: Api, db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.3.0")
    fleet.devices(1)
    base = {"model": "face", "version": "1.3.0", "target": {"tags": {"site": "berlin"}}}
    cases = [
        ({**base, "version": "9.9.9"}, (404, "not_found")),
        ({**base, "target": {"tags": {"site": "paris"}}}, (422, "no_devices")),
        ({**base, "target": {"devices": ["cam-00", "ghost"]}}, (422, "unknown_device")),
        ({**base, "variants": {"*": "int8"}}, (422, "unknown_variant")),
        ({**base, "waves": "1,50%"}, (422, "invalid")),
        ({**base, "colour": "red"}, (422, "invalid")),
    ]
    for body, expected in cases:
        assert _err(api.call("POST", "/api/v1/rollouts", json=body)) == expected, body
    assert _err(api.call("GET", "/api/v1/rollouts/77", Role.VIEWER)) == (404, "not_found")
    assert _err(api.call("POST", "/api/v1/rollouts/77/abort")) == (404, "not_found")


def test_pins_over_http(api: Api, db: Database) -> None:
    fleet = Fleet(db)
    fleet.release("1.2.0")
    fleet.devices(1)
    url = "/api/v1/devices/cam-00/pins"
    put = {"version": "1.2.0"}
    assert _err(api.call("PUT", f"{url}/face", Role.VIEWER, json=put)) == (403, "forbidden")
    pin = api.call("PUT", f"{url}/face", json=put).json()
    assert (pin["version"], pin["variant"]) == ("1.2.0", "default")
    assert [p["model"] for p in api.call("GET", url, Role.VIEWER).json()] == ["face"]
    assert fleet.desired() == {"cam-00": ("1.2.0", None, 1)}
    bad = api.call("PUT", f"{url}/face", json={"version": "1.2.0", "variant": "int8"})
    assert _err(bad) == (422, "no_variant")
    assert _err(api.call("PUT", "/api/v1/devices/ghost/pins/face", json=put)) == (404, "not_found")
    assert api.call("DELETE", f"{url}/face").json()["version"] == "1.2.0"
    assert _err(api.call("DELETE", f"{url}/face")) == (404, "not_found")
    audit = api.call("GET", "/api/v1/audit?target_id=cam-00").json()["items"]
    assert [e["action"] for e in audit][:2] == ["device.unpin", "device.pin"]
