#!/usr/bin/env python3
"""Fleet scale: the server under 1,000 / 5,000 / 10,000 simulated devices.

For each size, from scratch (a fresh Mosquitto, data dir and ``edge-fleet serve``, all on
127.0.0.1), with ``scripts/simulate-fleet`` holding every device on its own MQTT
connection (auto-registered by the ingest; ``--sim-processes K`` splits the devices over K
simulator processes), telemetry every ``--interval`` seconds:

1. **connect**: seconds until the server has every device ``online``;
2. **steady state** over ``--steady`` seconds: CPU (% of one core) and RSS of the server,
   the broker and the simulator; telemetry rows written per second; **ingest lag**: a
   probe device publishes a telemetry document every 0.5 s and the benchmark times each
   one from its publish to its row in the database (polled every 20 ms);
3. **dashboard**: ``GET /`` and ``GET /devices`` with a logged-in session (median of 5),
   and, when Playwright and ``/usr/bin/chromium`` are there, the page load in Chromium
   (navigation start to the load event, median of 3);
4. **rollout**: ``face 1.0.0 -> 1.1.0`` to every device in 4 waves (``1,10%,50%,100%``),
   devices with zero probation and zero step time: seconds from ``POST`` to the last
   device ``committed``, bounded by ``--rollout-timeout`` (then: how far it got).

    benchmarks/fleet_scale.py [--sizes 1000,5000,10000] [--interval 10] [--steady 60]
                              [--rollout-timeout 240] [--database-url URL]
                              [--sim-processes 1] [--http-concurrency 8]
                              [--server-workers 1]

Everything shares this machine's cores: the simulator and the broker compete with the
server for them, so the figures are a lower bound for a server host of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as paho
import psutil
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine, text

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from agent.profiles import list_profiles  # noqa: E402
from tests.server.conftest import BundleFactory  # noqa: E402  (the tiny affine bundle)

PY = sys.executable
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CHROMIUM = Path("/usr/bin/chromium")
PROBE = "lag-probe"
PREFIX = "dev"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


@contextlib.contextmanager
def process(argv: list[str], log: Path, stop: int = signal.SIGTERM) -> Iterator[psutil.Process]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield psutil.Process(proc.pid)
    finally:
        if proc.poll() is None:
            proc.send_signal(stop)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def cli(*argv: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(
        [PY, "-m", "fleet_server.cli", *argv],
        env=env or ENV,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return out.stdout


class Sampler:
    """CPU (% of one core) and peak RSS of some processes over a window (summed over the
    processes of one role, e.g. several simulators)."""

    def __init__(self, procs: dict[str, psutil.Process | list[psutil.Process]]) -> None:
        self.procs = {k: p if isinstance(p, list) else [p] for k, p in procs.items()}
        self.rss: dict[str, int] = dict.fromkeys(procs, 0)
        self._cpu0 = {k: self._cpu(p) for k, p in self.procs.items()}
        self._t0 = time.monotonic()

    @staticmethod
    def _cpu(procs: list[psutil.Process]) -> float:
        total = 0.0
        for p in procs:
            t = p.cpu_times()
            total += float(t.user + t.system)
        return total

    def sample(self) -> None:
        for k, procs in self.procs.items():
            with contextlib.suppress(psutil.Error):
                self.rss[k] = max(self.rss[k], sum(p.memory_info().rss for p in procs))

    def cpu_percent(self) -> dict[str, float]:
        span = time.monotonic() - self._t0
        return {k: 100 * (self._cpu(p) - self._cpu0[k]) / span for k, p in self.procs.items()}


class LagProbe:
    """Publishes telemetry of one device and times each document into the database."""

    def __init__(self, port: int, db_url: str) -> None:
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=PROBE)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.engine = create_engine(db_url)
        self.lags: list[float] = []
        self._sent: dict[int, float] = {}
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def register(self) -> None:
        """An online status whose profile no release fits: rollouts skip the probe."""
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        doc = {
            "state": "online",
            "ts": now,
            "agent_version": "0",
            "profile": "benchmark-probe",
            "started_at": now,
            "models": {},
        }
        self.client.publish(f"edge/{PROBE}/status", json.dumps(doc), qos=1, retain=True)

    def _doc(self, seq: int) -> bytes:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
        system = {
            "cpu_percent": 1.0,
            "mem_used_bytes": 1,
            "mem_total_bytes": 2,
            "agent_rss_bytes": 1,
            "disk_free_bytes": 1,
        }
        return json.dumps({"ts": now, "seq": seq, "system": system, "models": {}}).encode()

    def run(self, seconds: float) -> None:
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        seq = int(time.time())  # above anything a former window sent
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            seq += 1
            with self._lock:
                self._sent[seq] = time.monotonic()
            self.client.publish(f"edge/{PROBE}/telemetry", self._doc(seq), qos=0)
            time.sleep(0.5)
        time.sleep(3)  # the last ones land
        self._stop.set()
        reader.join()

    def _read(self) -> None:
        query = text("SELECT max(seq) FROM telemetry_points WHERE device_id = :d")
        with self.engine.connect() as conn:
            while not self._stop.is_set():
                top = conn.execute(query, {"d": PROBE}).scalar() or 0
                conn.rollback()
                now = time.monotonic()
                with self._lock:
                    for s in [s for s in self._sent if s <= top]:
                        self.lags.append(now - self._sent.pop(s))
                time.sleep(0.02)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()
        self.engine.dispose()


def dashboard_http(url: str, token: str) -> dict[str, float] | None:
    """Median ms of ``GET /`` and ``GET /devices`` with a session; None without a dashboard."""
    with httpx.Client(base_url=url, timeout=60) as c:
        form = c.get("/login", params={"next": "/"})
        nonce = re.search(r'name="nonce" value="([^"]+)"', form.text)
        if form.status_code != 200 or nonce is None:
            return None
        c.post("/login", data={"nonce": nonce[1], "token": token, "next": "/"})
        out = {}
        for path in ("/", "/devices"):
            times = []
            for _ in range(5):
                t0 = time.perf_counter()
                r = c.get(path)
                times.append(1000 * (time.perf_counter() - t0))
                r.raise_for_status()
            out[path] = statistics.median(times)
        return out


def dashboard_chromium(url: str, token: str) -> dict[str, float] | str:
    """Median ms from navigation start to the load event in Chromium, or why not."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return "playwright not installed"
    if not CHROMIUM.exists():
        return f"{CHROMIUM} missing"
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
    timing = (
        "() => { const n = performance.getEntriesByType('navigation')[0];"
        " return n.loadEventEnd - n.startTime; }"
    )
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=args)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.goto(f"{url}/login?next=/")
            page.get_by_label("API token").fill(token)
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(f"{url}/")
            out = {}
            for path in ("/", "/devices"):
                times = []
                for _ in range(3):
                    page.goto(f"{url}{path}", wait_until="load")
                    times.append(float(page.evaluate(timing)))
                out[path] = statistics.median(times)
            return out
        finally:
            browser.close()


@dataclass
class Result:
    devices: int
    figures: dict[str, Any] = field(default_factory=dict)


def count_online(engine: Any) -> int:
    with engine.connect() as conn:
        q = text("SELECT count(*) FROM devices WHERE reported_state = 'online' AND id LIKE :p")
        return int(conn.execute(q, {"p": f"{PREFIX}-%"}).scalar() or 0)


def http_requests(sim_stats: list[Path]) -> int:
    """HTTP requests the simulators sent so far."""
    return sum(int(json.loads(f.read_text()).get("http_requests", 0)) for f in sim_stats)


def rollout(api: httpx.Client, n: int, timeout: float, sim_stats: list[Path]) -> dict[str, Any]:
    spec = {
        "model": "face",
        "version": "1.1.0",
        "target": {"all_devices": True},
        "waves": ["1", "10%", "50%", "100%"],
        "probation_s": 600,
        "dwell_s": 3600,
    }
    http0 = http_requests(sim_stats)
    t0 = time.monotonic()
    r = api.post("/api/v1/rollouts", json=spec)
    r.raise_for_status()
    created = time.monotonic() - t0
    rid = r.json()["id"]
    waves: dict[int, float] = {}
    committed, state = 0, "running"
    while time.monotonic() - t0 < timeout:
        answer = api.get(f"/api/v1/rollouts/{rid}")
        if answer.status_code == 503:  # SQLite busy: ask again
            time.sleep(1.0)
            continue
        answer.raise_for_status()
        view = answer.json()
        state = view["state"]
        committed = sum(w["counts"].get("committed", 0) for w in view["waves_progress"])
        for w in view["waves_progress"]:
            if w["started"] and w["wave"] not in waves:
                waves[w["wave"]] = round(time.monotonic() - t0, 1)
        if state != "running":
            break
        time.sleep(1.0)
    took = time.monotonic() - t0
    http = http_requests(sim_stats) - http0
    return {
        "rollout_create_s": round(created, 2),
        "rollout_state": state,
        "rollout_committed": committed,
        "rollout_s": round(took, 1),
        "rollout_devices_per_s": round(committed / took, 1),
        "rollout_projected_s": round(n * took / committed) if committed else None,
        "wave_starts_s": waves,
        "rollout_http_requests": http,
        "rollout_http_per_s": round(http / took, 1),
    }


def run_size(n: int, args: argparse.Namespace, work: Path) -> Result:
    res = Result(n)
    data, mqtt_port, http_port = work / "data", free_port(), free_port()
    (work / "mosquitto.conf").write_text(
        f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "set_tcp_nodelay true\nmax_queued_messages 10000\n"
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    cli("keys", "init", "--offline-dir", str(work / "offline"), "--data-dir", str(data))
    token = re.search(
        r"eft_\S+",
        cli("token", "create", "--role", "admin", "--name", "bench", "--data-dir", str(data)),
    )
    assert token is not None
    db_url = args.database_url or f"sqlite:///{data / 'fleet.db'}"
    url = f"http://127.0.0.1:{http_port}"
    serve = [
        PY,
        "-m",
        "fleet_server.cli",
        "serve",
        "--data-dir",
        str(data),
        "--port",
        str(http_port),
        "--mqtt-url",
        f"mqtt://127.0.0.1:{mqtt_port}",
        "--log-level",
        "warning",
    ]
    if args.database_url:
        serve += ["--database-url", args.database_url]
    if args.server_workers > 1:
        serve += ["--workers", str(args.server_workers)]
    with (
        process(
            ["/usr/sbin/mosquitto", "-c", str(work / "mosquitto.conf")], work / "mosquitto.log"
        ) as broker,
        process(serve, work / "server.log") as server,
    ):
        wait_port(mqtt_port)
        wait_port(http_port, 60)
        env = {
            **ENV,
            "EDGE_FLEET_URL": url,
            "EDGE_FLEET_TOKEN": token[0],
            "XDG_CONFIG_HOME": str(work / "xdg"),
        }
        bundles = BundleFactory(work)
        # Bundles name their profiles: with none listed, the server's planner reads every
        # profile file once per device (see the report), which is not what we measure here.
        profiles = {"compatible_profiles": sorted(p.name for p in list_profiles())}
        for version in ("1.0.0", "1.1.0"):
            bundle = bundles("face", version, manifest_extra=profiles)
            cli("model", "push", str(bundle), "--version", version, env=env)
        # The simulated devices' TUF metadata (a dozen files each, rewritten on every
        # check): on tmpfs when there is one, so the simulator's own disk syscalls and
        # fsyncs do not take CPU from the server it measures.
        shm = Path("/dev/shm")
        sim_state = (
            Path(tempfile.mkdtemp(prefix="fleet-sim-", dir=shm))
            if shm.is_dir() and os.access(shm, os.W_OK)
            else work / "sim-state"
        )
        k = max(1, min(args.sim_processes, n))
        shares = [n // k + (1 if i < n % k else 0) for i in range(k)]
        stats = [work / f"sim-stats-{i}.json" for i in range(k)]
        sims = []
        for i, share in enumerate(shares):
            sims.append(
                [
                    str(REPO / "scripts" / "simulate-fleet"),
                    "--server",
                    url,
                    "--mqtt",
                    f"mqtt://127.0.0.1:{mqtt_port}",
                    "--devices",
                    str(share),
                    "--first-index",
                    str(sum(shares[:i])),
                    "--id-prefix",
                    PREFIX,
                    "--interval",
                    str(args.interval),
                    "--poll-interval",
                    "0",
                    "--no-initial-check",
                    "--connect-rate",
                    str(1000 / k),
                    "--probation",
                    "0",
                    "--step-time",
                    "0",
                    "--model",
                    "face@1.0.0",
                    "--http-concurrency",
                    str(args.http_concurrency),
                    "--summary-interval",
                    "5",
                    "--stats-file",
                    str(stats[i]),
                    "--state-dir",
                    str(sim_state / str(i)),
                    "--seed",
                    str(i),
                ]
            )
        engine = create_engine(db_url)
        with contextlib.ExitStack() as running:
            simulator = [
                running.enter_context(process(argv, work / f"simulator-{i}.log", signal.SIGINT))
                for i, argv in enumerate(sims)
            ]
            t0 = time.monotonic()
            while count_online(engine) < n:
                if time.monotonic() - t0 > 300:
                    raise RuntimeError(f"only {count_online(engine)} of {n} online after 300 s")
                time.sleep(0.5)
            res.figures["connect_s"] = round(time.monotonic() - t0, 1)
            time.sleep(args.interval)  # every device has sent telemetry once

            probe = LagProbe(mqtt_port, db_url)
            probe.register()
            servers = [server, *server.children(recursive=True)]  # with --server-workers
            procs = {"server": servers, "broker": broker, "simulator": simulator}
            sampler = Sampler(procs)
            rows0, t_rows = _rows(engine), time.monotonic()
            done = threading.Event()

            def sample() -> None:
                while not done.wait(1.0):
                    sampler.sample()

            threading.Thread(target=sample, daemon=True).start()
            probe.run(args.steady)
            done.set()
            sampler.sample()
            probe.close()
            rows = (_rows(engine) - rows0) / (time.monotonic() - t_rows)
            cpu = sampler.cpu_percent()
            lags = sorted(1000 * x for x in probe.lags)
            res.figures |= {
                "cpu_pct": {k: round(v, 1) for k, v in cpu.items()},
                "rss_mib": {k: round(v / 2**20) for k, v in sampler.rss.items()},
                "telemetry_rows_per_s": round(rows, 1),
                "ingest_lag_ms": {
                    "p50": round(statistics.median(lags)) if lags else None,
                    "p95": round(lags[int(0.95 * (len(lags) - 1))]) if lags else None,
                    "max": round(lags[-1]) if lags else None,
                    "n": len(lags),
                },
            }
            res.figures["dashboard_http_ms"] = dashboard_http(url, token[0])
            if res.figures["dashboard_http_ms"] is not None:
                try:
                    res.figures["dashboard_chromium_ms"] = dashboard_chromium(url, token[0])
                except Exception as exc:  # a browser problem must not lose the other figures
                    res.figures["dashboard_chromium_ms"] = f"failed: {exc}"[:200]
            with httpx.Client(
                base_url=url, timeout=120, headers={"Authorization": f"Bearer {token[0]}"}
            ) as api:
                rsampler = Sampler({"server": servers, "simulator": simulator})
                res.figures |= rollout(api, n, args.rollout_timeout, stats)
                res.figures["rollout_cpu_pct"] = {
                    k: round(v, 1) for k, v in rsampler.cpu_percent().items()
                }
                health = ingest_health(url, token[0])
                res.figures["ingest"] = {
                    k: health.get(k)
                    for k in (
                        "received",
                        "written",
                        "queue_full",
                        "rate_limited",
                        "db_retries",
                        "write_errors",
                    )
                }
        engine.dispose()
        if sim_state.parent == Path("/dev/shm"):
            shutil.rmtree(sim_state, ignore_errors=True)
    return res


def ingest_health(url: str, token: str) -> dict[str, Any]:
    """The ingest counters from ``/api/v1/health`` of the process running the ingest
    (with ``--server-workers``, new connections until one lands there)."""
    for _ in range(50):
        r = httpx.get(
            f"{url}/api/v1/health", headers={"Authorization": f"Bearer {token}"}, timeout=30
        )
        ingest = r.json().get("ingest")
        if ingest is not None:
            return dict(ingest)
    return {}


def _rows(engine: Any) -> int:
    with engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM telemetry_points")).scalar() or 0)


def _line(r: Result) -> str:
    f = r.figures
    lag = f.get("ingest_lag_ms", {})
    http = f.get("dashboard_http_ms") or {}
    chrome = f.get("dashboard_chromium_ms")
    chrome_s = (
        f"{chrome['/']:.0f}/{chrome['/devices']:.0f}"
        if isinstance(chrome, dict)
        else str(chrome or "-")
    )
    done = (
        f"{f['rollout_s']:.0f}"
        if f.get("rollout_state") == "completed"
        else f"{f.get('rollout_committed')}/{r.devices} in {f.get('rollout_s')}"
    )
    cpu, rss = f.get("cpu_pct", {}), f.get("rss_mib", {})
    return (
        f"{r.devices:>6} {f.get('connect_s', '-'):>7} {cpu.get('server', 0):>6.0f} "
        f"{rss.get('server', 0):>6} {cpu.get('broker', 0):>6.0f} {cpu.get('simulator', 0):>5.0f} "
        f"{lag.get('p50')!s:>5}/{lag.get('p95')!s:<5} {f.get('telemetry_rows_per_s', 0):>7.0f} "
        f"{http.get('/', 0):>6.0f}/{http.get('/devices', 0):<6.0f} {chrome_s:>11} {done:>14}"
    )


HEADER = (
    "devices connect server    srv   broker  sim    lag ms    rows/s   dash HTTP   Chromium"
    "     rollout\n"
    "           s     cpu%    MiB    cpu%   cpu%   p50/p95            / /devices  / /devices"
    "    all, s"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1000,5000,10000")
    parser.add_argument("--interval", type=float, default=10.0, help="telemetry interval (s)")
    parser.add_argument("--steady", type=float, default=60.0, help="steady-state window (s)")
    parser.add_argument("--rollout-timeout", type=float, default=240.0)
    parser.add_argument("--database-url", help="default: SQLite in each run's data dir")
    parser.add_argument("--http-concurrency", type=int, default=8, help="simulator workers")
    parser.add_argument(
        "--sim-processes", type=int, default=1, help="simulator processes sharing the devices"
    )
    parser.add_argument(
        "--server-workers", type=int, default=1, help="edge-fleet serve --workers N"
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch folders")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # the broker inherits it
    results = []
    print(
        f"machine: {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at start; "
        f"open files {hard}",
        flush=True,
    )
    for n in (int(s) for s in args.sizes.split(",")):
        work = Path(tempfile.mkdtemp(prefix=f"fleet-scale-{n}-"))
        try:
            print(f"--- {n} devices (load average {os.getloadavg()[0]:.2f})", flush=True)
            r = run_size(n, args, work)
            results.append(r)
            print(json.dumps(r.figures), flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
            else:
                print(f"kept {work}")
    print("\n" + HEADER)
    for r in results:
        print(_line(r))
    if args.json:
        args.json.write_text(json.dumps([{"devices": r.devices, **r.figures} for r in results]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
