"""The dashboard's pages over HTTP (FastAPI's test client), on SQLite and PostgreSQL:
login and sessions, role checks and CSRF on every post, the devices table's filters,
sort and keyset pages, the device page's chart data, models, audit, and rollouts."""

from __future__ import annotations

import json
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from fleet_server.api import create_app
from fleet_server.dashboard import mount_dashboard
from fleet_server.domain import ArtifactKind, Role, utcnow
from fleet_server.rollouts import operations
from fleet_server.rollouts.domain import RolloutSpec, RolloutState
from fleet_server.server import build_services
from fleet_server.store import releases, rollouts, tokens
from fleet_server.store.engine import Database
from tests.server.conftest import make_token, settings_for
from tests.server.dashboard_seed import (
    DeviceMessages,
    FleetShape,
    device_id,
    enrol,
    seed_inventory,
)

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from fastapi.testclient import TestClient

N = 120


@dataclass
class Dash:
    app: FastAPI
    db: Database
    shape: FleetShape
    tokens: dict[Role, str]

    def client(self, role: Role | None = None) -> TestClient:
        """A browser-like client, logged in as ``role`` (or not at all)."""
        c = TestClient(self.app, follow_redirects=False)
        if role is not None:
            r = login(c, self.tokens[role])
            assert r.status_code == 303, r.text
        return c


def login(c: TestClient, token: str, next_path: str = "/") -> Any:
    form = c.get("/login")
    nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
    assert nonce is not None
    return c.post("/login", data={"nonce": nonce.group(1), "token": token, "next": next_path})


def csrf_of(html: str) -> str:
    found = re.search(r'name="csrf" value="([^"]+)"', html)
    assert found is not None
    return found.group(1)


def device_ids(html: str) -> list[str]:
    return re.findall(r'<td data-label="Device"><a href="/devices/(cam-\d+)">', html)


@pytest.fixture
def dash(db: Database, tmp_path: Path) -> Iterator[Dash]:
    svc = build_services(settings_for(tmp_path / "data", db.url), db=db)
    app = create_app(svc)
    mount_dashboard(app)
    now = utcnow()
    shape = seed_inventory(db, N, now=now)
    enrol(db, device_id(0))
    msgs = DeviceMessages(db)
    msgs.telemetry_hour(device_id(0), now=now)
    with db.write() as s:
        for version in ("1.2.0", "1.3.0"):
            releases.add_variant(
                s,
                name="face",
                version=version,
                variant="default",
                kind=ArtifactKind.BUNDLE,
                format="onnx",
                sha256=(version.replace(".", "") * 64)[:64],
                size=4096,
                filename="face.tgz",
                manifest={"compatible_profiles": ["raspberry-pi-5", "jetson-orin"]},
                actor="token:ops#1",
            )
    yield Dash(app, db, shape, {role: make_token(db, role) for role in Role})
    svc.releases.validator.close()


def _rollout(dash: Dash) -> int:
    spec = RolloutSpec.model_validate(
        {
            "model": "face",
            "version": "1.3.0",
            "target": {"tags": {"ring": "canary"}},
            "waves": ["2", "100%"],
        }
    )
    with dash.db.write() as s:
        view = operations.create(
            s, spec, actor="token:ops#1", now=utcnow(), stale_after=timedelta(seconds=30)
        )
    return view.id


def _state(dash: Dash, rollout_id: int) -> RolloutState:
    with dash.db.read() as s:
        return rollouts.get_rollout(s, rollout_id).state


# --- login and sessions ---------------------------------------------------------------


def test_pages_ask_for_a_login_first(dash: Dash) -> None:
    c = dash.client()
    r = c.get("/devices?state=online")
    assert r.status_code == 303
    assert r.headers["location"] == "/login?next=/devices%3Fstate%3Donline"
    assert c.get("/live/overview").status_code == 401  # fragments do not redirect


def test_login_sets_a_strict_httponly_cookie_without_the_token(dash: Dash) -> None:
    c = dash.client()
    token = dash.tokens[Role.VIEWER]
    r = login(c, token, next_path="/devices")
    assert r.status_code == 303 and r.headers["location"] == "/devices"
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and "efd_session" in v)
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and "Path=/" in cookie
    assert token not in cookie and token[4:20] not in cookie
    page = c.get("/devices")
    assert page.status_code == 200
    assert token not in page.text  # nor anywhere in the pages
    assert page.headers["content-security-policy"].startswith("default-src 'self'")
    assert page.headers["x-frame-options"] == "DENY"


def test_over_https_the_cookie_is_secure(dash: Dash) -> None:
    c = TestClient(dash.app, base_url="https://testserver", follow_redirects=False)
    r = login(c, dash.tokens[Role.VIEWER])
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and "efd_session" in v)
    assert "Secure" in cookie


def test_a_bad_token_or_a_forged_login_form_is_refused(dash: Dash) -> None:
    c = dash.client()
    r = login(c, "eft_" + "x" * 43)
    assert r.status_code == 401 and "unknown API token" in r.text
    assert "efd_session" not in r.headers.get("set-cookie", "")
    # a login form posted without this site's nonce (login CSRF)
    r = TestClient(dash.app).post(
        "/login", data={"nonce": "guess", "token": dash.tokens[Role.ADMIN]}
    )
    assert r.status_code == 403 and "csrf failed" in r.text


def test_revoking_the_token_ends_its_sessions(dash: Dash) -> None:
    c = dash.client(Role.OPERATOR)
    assert c.get("/").status_code == 200
    with dash.db.write() as s:
        op = next(t for t in tokens.list_api_tokens(s) if t.role is Role.OPERATOR)
        tokens.revoke_api_token(s, op.id, actor="test")
    assert c.get("/").status_code == 303


def test_logout_needs_the_csrf_secret(dash: Dash) -> None:
    c = dash.client(Role.VIEWER)
    page = c.get("/")
    assert c.post("/logout", data={}).status_code == 403
    r = c.post("/logout", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303
    assert c.get("/").status_code == 303


# --- the pages --------------------------------------------------------------------------


def _stat(html: str, key: str) -> int:
    found = re.search(rf'data-stat="{key}">([\d,]+)<', html)
    assert found is not None, key
    return int(found.group(1).replace(",", ""))


def test_the_overview_counts_devices_by_state_profile_and_version(dash: Dash) -> None:
    html = dash.client(Role.VIEWER).get("/").text
    shape = dash.shape
    assert _stat(html, "total") == N
    assert _stat(html, "online") == shape.online
    assert _stat(html, "degraded") == shape.degraded
    assert _stat(html, "stale") == shape.stale
    assert _stat(html, "offline") == shape.offline
    assert "raspberry-pi-5" in html and "jetson-orin" in html
    # every 10th device runs face 1.1.0
    assert re.search(r"face%401.1.0\">1.1.0</a></td>\s*<td class=\"num\">12<", html)


def test_the_device_table_filters(dash: Dash) -> None:
    c = dash.client(Role.VIEWER)
    stale = c.get("/devices?state=stale&limit=200").text
    assert len(device_ids(stale)) == dash.shape.stale
    canary = device_ids(c.get("/devices?tag=ring%3Dcanary").text)
    assert canary == sorted(dash.shape.canary)
    old = device_ids(c.get("/devices?version=face%401.1.0&limit=200").text)
    assert old == [device_id(i) for i in range(N) if i % 10 == 9]
    pi = device_ids(c.get("/devices?profile=jetson-orin&q=01&limit=200").text)
    assert pi == [device_id(i) for i in range(N) if i % 3 == 1 and "01" in device_id(i)]
    bad = c.get("/devices?tag=%3Dx")
    assert bad.status_code == 200 and 'role="alert"' in bad.text
    assert c.get("/devices?limit=5000").status_code == 422


@pytest.mark.parametrize(
    ("sort", "order"), [("id", "asc"), ("last_seen", "desc"), ("profile", "asc")]
)
def test_keyset_pages_walk_the_whole_fleet_both_ways(dash: Dash, sort: str, order: str) -> None:
    c = dash.client(Role.VIEWER)
    url = f"/devices?sort={sort}&order={order}&limit=25"
    pages: list[list[str]] = []
    html = c.get(url).text
    while True:
        pages.append(device_ids(html))
        nxt = re.search(r'href="(/devices\?[^"]*after=[^"]+)" rel="next"', html)
        if nxt is None:
            break
        html = c.get(nxt.group(1).replace("&amp;", "&")).text
    seen = [d for p in pages for d in p]
    assert sorted(seen) == [device_id(i) for i in range(N)]  # each device exactly once
    if sort == "id":
        assert seen == sorted(seen)
    # and back again from the last page
    for expected in reversed(pages[:-1]):
        prev = re.search(r'href="(/devices\?[^"]*before=[^"]+)" rel="prev"', html)
        assert prev is not None
        html = c.get(prev.group(1).replace("&amp;", "&")).text
        assert device_ids(html) == expected
    assert 'rel="prev"' not in html


def test_the_device_page_charts_its_telemetry(dash: Dash) -> None:
    c = dash.client(Role.VIEWER)
    html = c.get(f"/devices/{device_id(0)}?window=1h").text
    found = re.search(r'id="chart-data">(.*?)</script>', html, re.S)
    assert found is not None
    charts = {ch["key"]: ch for ch in json.loads(found.group(1))["charts"]}
    assert charts["cpu"]["y_title"] == "CPU (%)"
    cpu = [v for v in charts["cpu"]["series"][0]["y"] if v is not None]
    assert len(cpu) >= 58 and min(cpu) >= 14 and max(cpu) <= 66
    temps = [v for v in charts["temperature"]["series"][0]["y"] if v is not None]
    assert all(49.9 <= t <= 60.1 for t in temps)
    total = charts["memory"]["series"][1]
    assert total["name"] == "total" and set(v for v in total["y"] if v) == {4096.0}
    (face,) = charts["latency"]["series"]
    assert face["name"] == "face" and all(15.9 <= v <= 24.1 for v in face["y"] if v is not None)
    rates = [v for v in charts["errors"]["series"][0]["y"] if v is not None]
    assert rates and all(v == pytest.approx(1.0) for v in rates)  # 6 of 600 per minute
    assert "raspberry-pi-5" in html and "CPU" in html  # profile and provider in use
    assert "BCM2712" in html and "xnnpack → cpu" in html  # what the profile means
    assert "6.6.31+rpt-rpi-2712" in html  # the facts sent at enrolment
    assert c.get("/devices/no-such-device").status_code == 404


def test_the_models_page_shows_hashes_and_where_versions_run(dash: Dash) -> None:
    html = dash.client(Role.VIEWER).get("/models").text
    assert "130" * 21 in html  # the 1.3.0 variant's sha256
    running = N - N // 10  # on 1.2.0: all but every 10th
    assert re.search(rf"face%401.2.0\">{running} devices</a>", html)
    assert "not set up" in html  # no TUF repository in this data folder


def test_the_audit_log_is_for_operators(dash: Dash) -> None:
    assert dash.client(Role.VIEWER).get("/audit").status_code == 403
    html = dash.client(Role.OPERATOR).get("/audit?target_type=release").text
    assert html.count("<code>release.publish</code>") == 2
    viewer_nav = dash.client(Role.VIEWER).get("/").text
    assert "Audit log" not in viewer_nav


# --- rollouts: buttons, role and CSRF checks ------------------------------------------------


def test_viewers_see_no_buttons_and_cannot_post(dash: Dash) -> None:
    rid = _rollout(dash)
    viewer = dash.client(Role.VIEWER)
    page = viewer.get(f"/rollouts/{rid}").text
    main = page.split("</header>")[1]
    assert 'method="post"' not in main  # the only post form is the header's log-out
    assert "Pause</button>" not in main
    r = viewer.post(f"/rollouts/{rid}/pause", data={"csrf": csrf_of(page)})
    assert r.status_code == 403 and "needs the operator role" in r.text
    assert _state(dash, rid) is RolloutState.RUNNING


def test_a_post_without_the_csrf_secret_is_refused(dash: Dash) -> None:
    rid = _rollout(dash)
    op = dash.client(Role.OPERATOR)
    page = op.get(f"/rollouts/{rid}").text
    for action in ("pause", "abort", "rollback"):
        assert f'action="/rollouts/{rid}/{action}"' in page
    assert f'action="/rollouts/{rid}/resume"' not in page
    assert op.post(f"/rollouts/{rid}/abort", data={}).status_code == 403
    assert op.post(f"/rollouts/{rid}/abort", data={"csrf": "x" * 43}).status_code == 403
    assert dash.client().post(f"/rollouts/{rid}/abort", data={}).status_code == 401
    assert _state(dash, rid) is RolloutState.RUNNING


def test_operators_pause_and_resume_from_the_page(dash: Dash) -> None:
    rid = _rollout(dash)
    op = dash.client(Role.OPERATOR)
    csrf = csrf_of(op.get(f"/rollouts/{rid}").text)
    r = op.post(f"/rollouts/{rid}/pause", data={"csrf": csrf})
    assert r.status_code == 303 and r.headers["location"] == f"/rollouts/{rid}?done=pause"
    assert _state(dash, rid) is RolloutState.PAUSED
    page = op.get(r.headers["location"]).text
    assert "Paused: nothing new is assigned" in page and "paused by token:operator#" in page
    assert f'action="/rollouts/{rid}/resume"' in page
    again = op.post(f"/rollouts/{rid}/pause", data={"csrf": csrf})
    assert again.status_code == 409 and "cannot pause a rollout that is paused" in again.text
    assert op.post(f"/rollouts/{rid}/resume", data={"csrf": csrf}).status_code == 303
    assert _state(dash, rid) is RolloutState.RUNNING
    assert op.post(f"/rollouts/{rid}/explode", data={"csrf": csrf}).status_code == 404
    audit = op.get(f"/audit?target_type=rollout&target_id={rid}").text
    assert "rollout.pause" in audit and "rollout.resume" in audit


def test_the_live_fragments_follow_the_rollout(dash: Dash) -> None:
    rid = _rollout(dash)
    op = dash.client(Role.OPERATOR)
    live = op.get(f"/live/rollouts/{rid}").text
    assert "<html" not in live and 'data-wave-done="1">0<' in live
    overview = op.get("/live/overview").text
    assert f"#{rid} face 1.3.0" in overview
    with dash.db.write() as s:
        operations.abort(s, rid, actor="test", now=utcnow())
    assert "aborted by test" in op.get(f"/live/rollouts/{rid}").text
    assert f"#{rid} face" not in op.get("/live/overview").text  # no longer active


def test_assets_come_from_this_server(dash: Dash) -> None:
    c = dash.client()
    css = c.get("/static/dashboard/app.css")
    assert css.status_code == 200 and "--accent" in css.text
    js = c.get("/static/vendor/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000
    assert js.headers["content-type"].startswith("text/javascript")
    page = dash.client(Role.VIEWER).get(f"/devices/{device_id(0)}").text
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert sources and all(
        s.startswith(("/", "#", "data:")) for s in sources
    )  # nothing from elsewhere
