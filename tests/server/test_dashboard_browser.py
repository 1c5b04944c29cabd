"""The dashboard in a real headless Chromium (Debian's ``chromium``, driven by Playwright)
against a real ``edge-fleet serve`` on SQLite with 10,000 devices.

The fleet is seeded through the ingest's write path (bulk) and its full path (telemetry
and update events), releases are uploaded through the API and signed, the rollout is
created through the API and advanced by the server's own rollout engine. The test logs
in, opens every page, filters the devices, watches the rollout move and pauses it from
its button; a viewer sees no buttons; forged posts are refused.

Screenshots of every page at 1280x800 and on a 390-px-wide phone are saved to
``$EDGE_FLEET_ARTIFACTS`` (default ``.artifacts/dashboard`` in the repository, ignored by
git). The overview and devices page load times at 10,000 devices are printed.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from fleet_server.domain import Role, utcnow
from fleet_server.store import migrate
from fleet_server.store.engine import Database
from tests.server.conftest import BundleFactory, make_token
from tests.server.dashboard_seed import (
    DeviceMessages,
    FleetShape,
    device_id,
    enrol,
    seed_inventory,
)
from tests.server.live import free_port, init_signing

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEVICES = 10_000
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

if os.environ.get("CI"):
    # scripts/test installs both in CI: there, a missing one is a failure, not a skip.
    import playwright.sync_api as playwright_sync

    assert CHROMIUM.exists(), "no /usr/bin/chromium: scripts/setup --tests installs it"
else:
    playwright_sync = pytest.importorskip("playwright.sync_api", reason="pip install playwright")
    if not CHROMIUM.exists():
        pytest.skip(
            "no /usr/bin/chromium: apt-get install chromium (never `playwright install`)",
            allow_module_level=True,
        )


def artifacts() -> Path:
    path = Path(os.environ.get("EDGE_FLEET_ARTIFACTS") or REPO / ".artifacts") / "dashboard"
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class Server:
    url: str
    db: Database
    shape: FleetShape
    tokens: dict[Role, str]
    proc: subprocess.Popen[bytes]
    log: Path
    rollout: int | None = None

    def api(self, role: Role = Role.OPERATOR) -> httpx.Client:
        return httpx.Client(
            base_url=self.url, headers={"Authorization": f"Bearer {self.tokens[role]}"}
        )


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"edge-fleet serve exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"edge-fleet serve did not get ready:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("dash")
    data = root / "data"
    init_signing(data, root / "offline")  # TUF keys and repositories, so releases are signed
    db = Database(f"sqlite:///{data / 'fleet.db'}")
    migrate.upgrade(db)
    started = time.perf_counter()
    shape = seed_inventory(db, DEVICES, now=utcnow())
    print(f"\nseeded {DEVICES} devices in {time.perf_counter() - started:.1f} s")
    tokens = {role: make_token(db, role, name=f"{role.value}-1") for role in Role}
    config = root / "server.yaml"
    config.write_text(yaml.safe_dump({"validation": {"isolation": "inline"}}), encoding="utf-8")
    port = free_port()
    log = root / "server.log"
    exe = Path(sys.executable).parent / "edge-fleet"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                str(exe),
                "serve",
                "--data-dir",
                str(data),
                "--config",
                str(config),
                "--port",
                str(port),
                "--log-level",
                "warning",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        yield Server(url, db, shape, tokens, proc, log)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        db.dispose()
        shutil.copy(log, artifacts() / "server.log")


@pytest.fixture(scope="module")
def seeded(server: Server, tmp_path_factory: pytest.TempPathFactory) -> Server:
    """Releases through the API (validated, signed), telemetry through the ingest."""
    bundles = BundleFactory(tmp_path_factory.mktemp("bundles"))
    extra = {"compatible_profiles": ["raspberry-pi-5", "jetson-orin"]}
    with server.api() as api:
        for version in ("1.2.0", "1.3.0"):
            path = bundles("face", version, manifest_extra=extra)
            with path.open("rb") as f:
                r = api.post("/api/v1/models", files={"file": (path.name, f)}, timeout=60)
            assert r.status_code == 201, r.text
    enrol(server.db, device_id(0))
    msgs = DeviceMessages(server.db)
    now = utcnow()
    msgs.telemetry_hour(device_id(0), now=now)
    return server


@dataclass
class Browser:
    browser: Any
    errors: list[str] = field(default_factory=list)

    def page(self, viewport: dict[str, int] = DESKTOP, state: Any = None) -> Any:
        phone = viewport["width"] < 600
        context = self.browser.new_context(
            viewport=viewport, is_mobile=phone, has_touch=phone, storage_state=state
        )
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.on("pageerror", lambda exc: self.errors.append(f"pageerror: {exc}"))
        page.on(
            "console",
            lambda msg: self.errors.append(f"console: {msg.text}") if msg.type == "error" else None,
        )
        return page


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield Browser(browser)
        finally:
            browser.close()


def log_in(b: Browser, server: Server, role: Role) -> Any:
    page = b.page()
    page.goto(f"{server.url}/devices")
    assert "/login?next=/devices" in page.url
    page.get_by_label("API token").fill(server.tokens[role])
    page.get_by_role("button", name="Log in").click()
    page.wait_for_url(f"{server.url}/devices")
    return page


def shoot(b: Browser, page: Any, name: str) -> None:
    """A full-page screenshot at 1280x800 and the same page on a phone."""
    out = artifacts()
    page.screenshot(path=str(out / f"{name}-desktop.png"), full_page=True)
    phone = b.page(PHONE, state=page.context.storage_state())
    phone.goto(page.url)
    phone.wait_for_load_state("networkidle")
    width = phone.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], f"{name}: the page is {width} px wide on a phone"
    phone.screenshot(path=str(out / f"{name}-phone.png"), full_page=True)
    phone.context.close()


def load_time(page: Any, url: str, runs: int = 3) -> float:
    """Median navigation time (request start to the load event), in seconds."""
    times: list[float] = []
    for _ in range(runs):
        page.goto(url, wait_until="load")
        nav = page.evaluate(
            "(() => { const n = performance.getEntriesByType('navigation')[0];"
            " return n.loadEventEnd - n.startTime; })()"
        )
        times.append(float(nav) / 1000)
    return statistics.median(times)


def test_every_page_renders_fast_at_ten_thousand_devices(chromium: Browser, seeded: Server) -> None:
    server = seeded
    login = chromium.page()
    login.goto(f"{server.url}/")
    shoot(chromium, login, "login")
    page = log_in(chromium, server, Role.OPERATOR)
    overview = load_time(page, f"{server.url}/")
    assert page.locator('[data-stat="total"]').inner_text() == f"{DEVICES:,}"
    assert page.locator('[data-stat="stale"]').inner_text() == f"{server.shape.stale:,}"
    shoot(chromium, page, "overview")
    devices = load_time(page, f"{server.url}/devices")
    assert page.locator("#match-count").inner_text() == f"{DEVICES:,} devices match."
    assert page.locator("table.devices tbody tr").count() == 50
    shoot(chromium, page, "devices")
    filtered = load_time(page, f"{server.url}/devices?state=stale&sort=last_seen&order=desc")
    print(
        f"\npage load at {DEVICES} devices (Chromium, median of 3):"
        f" overview {overview * 1000:.0f} ms, devices {devices * 1000:.0f} ms,"
        f" devices filtered+sorted {filtered * 1000:.0f} ms"
    )
    assert overview < 3 and devices < 3 and filtered < 3  # goal: < 1 s (printed above)

    page.goto(f"{server.url}/devices/{device_id(0)}")
    page.wait_for_selector("#chart-cpu .main-svg")
    for key in ("cpu", "memory", "temperature", "latency", "errors"):
        titles = page.locator(f"#chart-{key} .g-ytitle, #chart-{key} .g-xtitle").all_text_contents()
        assert "Time (UTC)" in titles and any("(" in t for t in titles), (key, titles)
    assert page.locator("#chart-latency .scatterlayer .trace").count() == 1  # face
    shoot(chromium, page, "device")
    page.select_option("#window", "6h")
    page.wait_for_url("**window=6h")
    page.wait_for_selector("#chart-cpu .main-svg")

    page.goto(f"{server.url}/models")
    assert page.locator(".badge", has_text="signed").count() == 2
    shoot(chromium, page, "models")
    page.goto(f"{server.url}/audit")
    assert page.locator("code", has_text="release.publish").count() == 2
    shoot(chromium, page, "audit")
    assert chromium.errors == []


def test_filtering_sorting_and_paging_the_devices(chromium: Browser, seeded: Server) -> None:
    server = seeded
    page = log_in(chromium, server, Role.VIEWER)
    page.get_by_label("Tag").fill("ring=canary")
    page.get_by_label("Profile").select_option("jetson-orin")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url("**tag=ring%3Dcanary**")
    expected = sorted(d for d in server.shape.canary if int(d[4:]) % 3 == 1)
    rows = page.locator("table.devices tbody td:first-child a").all_inner_texts()
    assert rows == expected and expected
    shoot(chromium, page, "devices-filtered")
    page.goto(f"{server.url}/devices?state=offline")
    page.get_by_role("link", name="Last seen").click()
    page.wait_for_url("**sort=last_seen**")
    page.get_by_role("link", name="Next →").click()
    page.wait_for_url("**after=**")
    second = page.locator("table.devices tbody td:first-child a").all_inner_texts()
    assert len(second) == 50 and all(int(d[4:]) % 20 == 7 for d in second)
    page.get_by_role("link", name="← Previous").click()
    page.wait_for_url("**before=**")
    assert page.locator("table.devices tbody tr").count() == 50
    assert chromium.errors == []


def _devices_in(server: Server, rollout: int, state: str) -> list[str]:
    with server.api(Role.VIEWER) as api:
        r = api.get(f"/api/v1/rollouts/{rollout}/devices", params={"state": state})
        assert r.status_code == 200, r.text
        return [d["device_id"] for d in r.json()["items"]]


def _wait(what: str, check: Any, timeout: float = 20) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_rollout_moves_live_and_pauses_from_its_button(chromium: Browser, seeded: Server) -> None:
    server = seeded
    spec = {
        "model": "face",
        "version": "1.3.0",
        "target": {"tags": {"ring": "canary"}},
        "waves": ["2", "50%", "100%"],
        "dwell_s": 600,
    }
    with server.api() as api:
        r = api.post("/api/v1/rollouts", json=spec)
        assert r.status_code == 201, r.text
        rid = server.rollout = r.json()["id"]
    page = log_in(chromium, server, Role.OPERATOR)
    page.goto(f"{server.url}/rollouts/{rid}")
    live = page.locator("[data-live]")
    # the server's engine starts wave 1; the page follows without a reload
    page.wait_for_selector('tr.current span.cnt:has-text("assigned 2")')
    canaries = _wait("wave 1 assigned", lambda: _devices_in(server, rid, "assigned"))
    assert len(canaries) == 2
    msgs = DeviceMessages(server.db)
    for dev in canaries:
        msgs.update(dev, rid, at=utcnow())
    page.wait_for_selector('[data-wave-done="1"] >> text=2')
    page.wait_for_selector('tr.current span.cnt:has-text("assigned 4")')  # wave 2 started
    assert live.get_attribute("data-live-at") is not None
    shoot(chromium, page, "rollout-running")
    page.goto(f"{server.url}/")
    assert page.locator(".rollout-list li").first.inner_text().startswith(f"#{rid} face 1.3.0")

    page.goto(f"{server.url}/rollouts/{rid}")
    page.get_by_role("button", name="Pause").click()
    page.wait_for_url(f"**/rollouts/{rid}?done=pause")
    assert "Paused: nothing new is assigned" in page.locator("p.ok").inner_text()
    assert "paused by token:operator-1#" in page.locator("p.reason").inner_text()
    with server.api(Role.VIEWER) as api:
        assert api.get(f"/api/v1/rollouts/{rid}").json()["state"] == "paused"
    shoot(chromium, page, "rollout-paused")

    page.get_by_role("button", name="Resume").click()
    page.wait_for_url(f"**/rollouts/{rid}?done=resume")
    wave2 = _devices_in(server, rid, "assigned")
    assert len(wave2) == 4
    msgs.update(wave2[0], rid, at=utcnow(), outcome="failed")  # 1 of 3 decided: over 5 %
    for dev in wave2[1:]:
        msgs.update(dev, rid, at=utcnow())
    # the server's failure gate pauses the rollout; the open page shows why
    page.wait_for_selector('p.reason:has-text("failure gate")')
    assert page.locator("#state-h .badge").inner_text() == "paused"
    assert "failed" in page.locator("ul.gates").inner_text()
    shoot(chromium, page, "rollout-gate-paused")
    page.goto(f"{server.url}/")
    assert page.locator(".rollout-list .reason").inner_text().startswith("failure gate")
    failure = page.locator("table[aria-labelledby=failures] tbody tr").first.inner_text()
    assert wave2[0] in failure and "golden_mismatch" in failure
    shoot(chromium, page, "overview-rollout")
    page.goto(f"{server.url}/rollouts")
    shoot(chromium, page, "rollouts")
    assert chromium.errors == []


def test_viewers_get_no_buttons_and_forged_posts_are_refused(
    chromium: Browser, seeded: Server
) -> None:
    server = seeded
    rid = server.rollout
    assert rid is not None, "runs after the rollout test"
    viewer = log_in(chromium, server, Role.VIEWER)
    viewer.goto(f"{server.url}/rollouts/{rid}")
    assert viewer.locator("main form[method=post]").count() == 0
    assert viewer.get_by_role("button", name="Resume").count() == 0
    assert viewer.get_by_role("link", name="Audit log").count() == 0
    assert chromium.errors == []
    post = """async ([url, csrf]) => {
        const body = new URLSearchParams(csrf ? {csrf} : {});
        return (await fetch(url, {method: 'POST', body})).status; }"""
    resume = f"{server.url}/rollouts/{rid}/resume"
    viewer_csrf = viewer.locator("header input[name=csrf]").get_attribute("value")
    assert viewer.evaluate(post, [resume, viewer_csrf]) == 403  # the role is re-checked
    operator = log_in(chromium, server, Role.OPERATOR)
    assert operator.evaluate(post, [resume, None]) == 403  # no CSRF secret
    assert operator.evaluate(post, [resume, "forged"]) == 403
    # another site's form: the SameSite=Strict cookie stays home, so there is no session
    form = f'<form id="f" method="post" action="{resume}"><input name="csrf" value="x"></form>'
    operator.route(
        "http://attacker.test/**",
        lambda route: route.fulfill(content_type="text/html", body=form),
    )
    operator.goto("http://attacker.test/")
    with operator.expect_navigation() as nav:
        operator.evaluate("document.getElementById('f').submit()")
    assert nav.value.status == 401
    with server.api(Role.VIEWER) as api:
        assert api.get(f"/api/v1/rollouts/{rid}").json()["state"] == "paused"
    # the browser logs the refusals it was sent; nothing else went wrong
    assert chromium.errors and all("status of 40" in e for e in chromium.errors)
