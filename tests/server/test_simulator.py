"""The fleet simulator (``fleet_server.simulator``, ``scripts/simulate-fleet``).

Unit tests of its documents, profiles and settings; then, over a real Mosquitto, the
Last Will of a device connection and the shared (load-only) mode; then end to end
against a real ``edge-fleet serve`` (its own process, ingesting from the broker):

- 40 enrolled devices (``--register enrol``, tags) appear online with their profiles and
  models; a rollout created with ``edge-fleet rollout create`` reaches them through their
  signed director metadata, and each reports ``committed``: the server ends ``completed``;
- 10 auto-registered devices on shared connections with ``--failure-rate 1.0``: the
  canary fails and the failure gate pauses the rollout before anyone else is touched;
- Ctrl-C: every device publishes its offline status.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import yaml

from agent.protocol import StatusDocument, TelemetryDocument, decode_document
from agent.protocol.documents import utc_now
from fleet_server.cli import main as fleet_main
from fleet_server.domain import Role
from fleet_server.errors import ConfigError
from fleet_server.simulator import Fleet, ModelSpec, SimulatorSettings
from fleet_server.simulator.cli import build_parser, settings_from
from fleet_server.simulator.device import VirtualDevice
from fleet_server.simulator.fleet import outage_chance
from fleet_server.simulator.settings import DEFAULT_PROFILES
from fleet_server.simulator.traits import pick_profile, traits_for
from fleet_server.store.engine import Database
from tests.broker import Mosquitto, free_port, probe, start_example
from tests.server.conftest import BundleFactory, make_token
from tests.server.live import init_signing

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
T = TypeVar("T")


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while (result := check()) is None:
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)
    return result


def device(device_id: str = "sim-00007", **settings: Any) -> VirtualDevice:
    s = SimulatorSettings(**settings)
    profile = pick_profile(device_id, s.profiles, s.seed)
    return VirtualDevice(
        device_id, traits_for(device_id, profile, s.seed), s.models, s, random.Random(1)
    )


# --- documents, profiles, settings (no broker) -------------------------------------------


def test_telemetry_is_a_protocol_document_with_plausible_values() -> None:
    d = device(profiles={"jetson-orin": 1}, request_rate=5.0, error_rate=0.1)
    docs = [decode_document(TelemetryDocument, d.telemetry(utc_now(), 10.0)) for _ in range(30)]
    assert [t.seq for t in docs] == list(range(1, 31))
    face = [t.models["face"] for t in docs]
    requests = [m.requests for m in face]
    assert requests == sorted(requests) and 30 * 50 * 0.5 <= requests[-1] <= 30 * 50 * 1.5
    errors = sum(face[-1].errors.values())
    assert 0.05 * requests[-1] < errors < 0.15 * requests[-1]  # counters since start
    assert all(m.provider == "TensorrtExecutionProvider" for m in face)
    for t in docs:
        lat = t.models["face"].latency_ms
        assert lat is not None and lat.p50 is not None and lat.p95 is not None
        assert 0 < lat.p50 < lat.p95 and lat.p99 is not None and lat.p95 < lat.p99
        assert lat.p50 < 10  # TensorRT on an Orin: milliseconds
        assert 0 < t.system.cpu_percent <= 100
        assert 0 < t.system.mem_used_bytes < t.system.mem_total_bytes == 8 * 1024**3
        assert t.system.temperature_c is not None and 30 < t.system.temperature_c < 90


def test_an_idle_model_reports_no_latency_and_a_cpu_profile_is_slower() -> None:
    idle = device(request_rate=0.0).telemetry(utc_now(), 10.0)
    doc = decode_document(TelemetryDocument, idle)
    assert doc.models["face"].latency_ms is None and doc.models["face"].requests == 0
    pi = device(profiles={"raspberry-pi-5": 1}, models=(ModelSpec.parse("face@1.0.0"),))
    orin = device(profiles={"jetson-orin": 1})
    assert pi.models["face"].latency_ms > 3 * orin.models["face"].latency_ms
    coral = device(profiles={"coral-usb": 1}, models=(ModelSpec.parse("det@2.0.0:tflite"),))
    assert coral.models["det"].provider == "EdgeTPU" and coral.models["det"].format == "tflite"


def test_status_and_will_are_protocol_documents() -> None:
    d = device(profiles={"rockchip-rk3588": 1})
    status = decode_document(StatusDocument, d.status())
    assert status.state == "online" and status.profile == "rockchip-rk3588"
    assert status.models is not None and status.models["face"].version == "1.0.0"
    assert status.models["face"].provider == "CPUExecutionProvider"
    assert decode_document(StatusDocument, d.offline_status()).state == "offline"
    d.install("face", "1.1.0", "ab" * 32)
    assert decode_document(StatusDocument, d.status()).models["face"].version == "1.1.0"  # type: ignore[index]
    assert d.serves("face", "1.1.0", "ab" * 32) and not d.serves("face", "1.1.0", "cd" * 32)


def test_profiles_follow_their_weights_and_are_stable() -> None:
    ids = [f"sim-{i:05d}" for i in range(6000)]
    mix = Counter(pick_profile(i, DEFAULT_PROFILES, 0) for i in ids)
    total = sum(DEFAULT_PROFILES.values())
    for name, weight in DEFAULT_PROFILES.items():
        assert abs(mix[name] / len(ids) - weight / total) < 0.03, (name, mix)
    assert [pick_profile(i, DEFAULT_PROFILES, 0) for i in ids[:50]] == [
        pick_profile(i, DEFAULT_PROFILES, 0) for i in ids[:50]
    ]
    assert Counter(pick_profile(i, DEFAULT_PROFILES, 1) for i in ids) != mix


def test_outage_chance_gives_the_offline_rate() -> None:
    for rate, interval, outage in ((0.05, 10.0, 60.0), (0.2, 2.0, 5.0), (0.5, 10.0, 30.0)):
        p = outage_chance(rate, interval, outage)
        x = p * outage / interval  # mean time offline over mean time online
        assert abs(x / (1 + x) - rate) < 1e-9
    assert outage_chance(0.0, 10, 60) == 0.0


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--profile", "toaster=1"], "unknown profile 'toaster'"),
        (["--register", "enrol"], "needs an operator API token"),
        (["--tag", "site=x"], "tags come with enrolment"),
        (["--mqtt", "mqtts://broker:8883"], "need certificates"),
        (["--model", "face"], "expected NAME@VERSION"),
        (["--failure-rate", "2"], "failure_rate"),
    ],
)
def test_bad_settings_are_refused_with_the_reason(flags: list[str], message: str) -> None:
    args = build_parser().parse_args(flags)
    with pytest.raises(ConfigError, match=message):
        settings_from(args, {})


def test_flags_become_settings() -> None:
    argv = ["--devices", "7", "--interval", "2s", "--duration", "10m", "--profile", "coral-usb=3"]
    argv += ["--model", "a@1.0.0", "--model", "b@2.0.0:tflite", "--register", "enrol"]
    argv += ["--tag", "site=x,ring=canary", "--connection", "shared"]
    s = settings_from(build_parser().parse_args(argv), {"EDGE_FLEET_TOKEN": "eft_x"})
    assert (s.devices, s.interval_s, s.duration_s, s.api_token) == (7, 2.0, 600.0, "eft_x")
    assert s.profiles == {"coral-usb": 3.0} and s.tags == {"site": "x", "ring": "canary"}
    assert [m.format for m in s.models] == ["onnx", "tflite"]
    assert s.device_ids()[:2] == ["sim-00000", "sim-00001"]


# --- over a real broker, no server -------------------------------------------------------


@pytest.mark.broker
@pytest.mark.parametrize("connection", ["device", "shared"])
def test_an_outage_is_announced_and_ends(mosquitto: Mosquitto, connection: str) -> None:
    """A device connection's outage makes the broker publish its Will; a shared
    connection's (load only) is announced by the simulator. Then it comes back."""
    prefix = f"lwt{connection}"
    settings = SimulatorSettings(
        mqtt_url=mosquitto.url,
        devices=3,
        id_prefix=prefix,
        connection=connection,
        connections=2,
        interval_s=0.5,
        poll_interval_s=0,
        initial_check=False,
        summary_interval_s=60,
    )
    fleet = Fleet(settings, out=None)
    with probe(mosquitto.port) as watcher:
        watcher.subscribe(f"edge/{prefix}-00001/#")

        def seen(kind: str, doc_state: str | None = None) -> Callable[[], bool | None]:
            def check() -> bool | None:
                with contextlib.suppress(queue.Empty):
                    msg = watcher.expect(0.2)
                    if msg.topic == f"edge/{prefix}-00001/{kind}":
                        doc = json.loads(msg.payload)
                        return doc_state is None or doc["state"] == doc_state or None
                return None

            return check

        async def scenario() -> None:
            run = asyncio.create_task(fleet.run())
            await asyncio.to_thread(wait_for, "online", seen("status", "online"), 10)
            await asyncio.to_thread(wait_for, "telemetry", seen("telemetry"), 10)
            target = fleet.devices[1]
            fleet.outage(target, 1.5)
            await asyncio.to_thread(wait_for, "the Will", seen("status", "offline"), 10)
            assert not target.online and fleet.stats.online == 2
            await asyncio.to_thread(wait_for, "back online", seen("status", "online"), 10)
            assert target.online and fleet.stats.online == 3
            fleet.stop()
            await run

        asyncio.run(scenario())
    assert fleet.stats.online == 0 and fleet.stats.drops == 1
    assert fleet.stats.reconnects == 1 and fleet.stats.lost == 0


# --- end to end: edge-fleet serve, the simulator, rollouts ---------------------------------


@dataclass
class Server:
    url: str
    token: str
    data: Path

    def api(self) -> httpx.Client:
        auth = {"Authorization": f"Bearer {self.token}"}
        return httpx.Client(base_url=self.url, headers=auth, timeout=30)


@contextlib.contextmanager
def running(argv: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)


def _ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> bool | None:
    assert proc.poll() is None, log.read_text()
    with contextlib.suppress(httpx.TransportError):
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200 or None
    return None


@pytest.fixture(scope="module")
def server(mosquitto: Mosquitto, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """``edge-fleet serve`` in its own process, with signing keys, a CA and face 1.0.0 and
    1.1.0 released (the tiny affine bundle, validated by the server)."""
    tmp = tmp_path_factory.mktemp("simulated-fleet")
    data = tmp / "data"
    init_signing(data, tmp / "offline")
    config = tmp / "server.yaml"
    config.write_text(
        yaml.safe_dump({"validation": {"isolation": "inline"}, "ingest": {"flush_interval_ms": 50}})
    )
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [sys.executable, "-m", "fleet_server.cli", "serve", "--config", str(config)]
    argv += ["--data-dir", str(data), "--port", str(port), "--mqtt-url", mosquitto.url]
    with running([*argv, "--log-level", "warning"], tmp / "server.log") as proc:
        wait_for("the server", lambda: _ready(url, proc, tmp / "server.log"))
        db = Database(f"sqlite:///{data / 'fleet.db'}")
        token = make_token(db, Role.OPERATOR, "simulator")
        db.dispose()
        srv = Server(url, token, data)
        bundles = BundleFactory(tmp)
        with srv.api() as api:
            for version in ("1.0.0", "1.1.0"):
                with bundles("face", version).open("rb") as f:
                    r = api.post(
                        "/api/v1/models",
                        files={"file": ("face.tgz", f)},
                        data={"version": version, "variant": "default"},
                    )
                assert r.status_code == 201, r.text
        yield srv


def simulate(server: Server, mosquitto: Mosquitto, tmp: Path, *flags: str) -> list[str]:
    argv = [str(REPO / "scripts" / "simulate-fleet"), "--server", server.url]
    argv += ["--mqtt", mosquitto.url, "--interval", "1", "--step-time", "0.05"]
    argv += ["--probation", "0.3", "--poll-interval", "0", "--min-check-interval", "0.5"]
    argv += ["--summary-interval", "1", "--duration", "120", "--api-token", server.token]
    return [*argv, "--stats-file", str(tmp / "stats.json"), *flags]


def devices(api: httpx.Client, **params: Any) -> list[dict[str, Any]]:
    r = api.get("/api/v1/devices", params={"limit": 500, **params})
    r.raise_for_status()
    items: list[dict[str, Any]] = r.json()["items"]
    return items


def rollout_when(
    api: httpx.Client, rid: int, done: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[str, Any]:
    def check() -> dict[str, Any] | None:
        view: dict[str, Any] = api.get(f"/api/v1/rollouts/{rid}").json()
        return view if done(view) else None

    return wait_for(f"rollout {rid}", check, timeout)


def stop(proc: subprocess.Popen[bytes], log: Path) -> str:
    """Ctrl-C the simulator; its output."""
    proc.send_signal(signal.SIGINT)
    assert proc.wait(20) == 0, log.read_text()
    return log.read_text()


@pytest.mark.slow
@pytest.mark.broker
def test_enrolled_fleet_comes_online_and_takes_a_rollout(
    server: Server,
    mosquitto: Mosquitto,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    n = 40
    log = tmp_path / "sim.log"
    argv = simulate(server, mosquitto, tmp_path, "--devices", str(n), "--id-prefix", "ok")
    argv += ["--register", "enrol", "--tag", "fleet=sim-ok"]
    with server.api() as api, running(argv, log) as sim:
        wait_for(
            "the fleet online",
            lambda: len(devices(api, tag="fleet=sim-ok", state="online")) == n or None,
        )
        listed = {d["id"]: d for d in devices(api, tag="fleet=sim-ok")}
        for device_id, d in listed.items():
            assert d["profile"] == pick_profile(device_id, DEFAULT_PROFILES, 0)
            assert d["facts"]["profile"] == d["profile"] and d["cert_serial"]
            assert [(m["name"], m["version"]) for m in d["models"]] == [("face", "1.0.0")]
            assert d["models"][0]["provider"] and d["tags"] == {"fleet": "sim-ok"}
        assert len({d["profile"] for d in listed.values()}) >= 3
        points = wait_for(
            "telemetry",
            lambda: api.get("/api/v1/devices/ok-00003/telemetry").json()["points"] or None,
        )
        assert 0 < points[-1]["cpu_percent"] <= 100
        assert 0 < points[-1]["mem_used_bytes"] < points[-1]["mem_total_bytes"]

        monkeypatch.setenv("EDGE_FLEET_URL", server.url)
        monkeypatch.setenv("EDGE_FLEET_TOKEN", server.token)
        monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
        create = ["rollout", "create", "--model", "face@1.1.0", "--target", "fleet=sim-ok"]
        assert fleet_main([*create, "--waves", "1,50%,100%", "--probation", "30s"]) == 0
        rid = int(capsys.readouterr().out.split()[1].rstrip(":"))
        view = rollout_when(api, rid, lambda v: v["state"] != "running", 45)
        assert view["state"] == "completed", view
        assert [w["counts"] for w in view["waves_progress"]] == [
            {"committed": 1},
            {"committed": 19},
            {"committed": 20},
        ]
        updated = wait_for(
            "the new version in the statuses",
            lambda: len(devices(api, tag="fleet=sim-ok", model_version="1.1.0")) == n or None,
        )
        assert updated
        out = stop(sim, log)
    stats = json.loads((tmp_path / "stats.json").read_text())
    assert stats["events"]["committed"] == n and stats["check_errors"] == {}
    assert "40/40 online" in out and out.splitlines()[-1].startswith("stopped: ")


@pytest.mark.slow
@pytest.mark.broker
def test_a_failing_canary_pauses_the_rollout(
    server: Server, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    n = 10
    log = tmp_path / "sim.log"
    argv = simulate(server, mosquitto, tmp_path, "--devices", str(n), "--id-prefix", "bad")
    argv += ["--profile", "jetson-xavier=1", "--failure-rate", "1.0"]
    argv += ["--connection", "shared", "--connections", "2"]  # auto-registered, load only
    with server.api() as api, running(argv, log) as sim:
        wait_for(
            "the fleet online",
            lambda: len(devices(api, profile="jetson-xavier", state="online")) == n or None,
        )
        spec = {
            "model": "face",
            "version": "1.1.0",
            "target": {"profile": "jetson-xavier"},
            "waves": ["1", "50%", "100%"],
            "gates": {"failure": {"max_ratio": 0.05, "min_devices": 1}},
        }
        r = api.post("/api/v1/rollouts", json=spec)
        assert r.status_code == 201, r.text
        rid = r.json()["id"]
        view = rollout_when(api, rid, lambda v: v["state"] != "running", 30)
        assert view["state"] == "paused", view
        assert view["reason"]["code"] == "failure_ratio", view["reason"]
        assert view["waves_progress"][0]["counts"] == {"failed": 1}
        later = [w["counts"] for w in view["waves_progress"][1:]]
        assert later == [{"pending": 4}, {"pending": 5}]  # cumulative waves: 1, 5, 10
        (canary,) = api.get(f"/api/v1/rollouts/{rid}/devices", params={"wave": 1}).json()["items"]
        assert canary["reason"]["code"] in ("golden_mismatch", "error_rate_regression")
        time.sleep(2)  # nothing else moves
        assert devices(api, profile="jetson-xavier", model_version="1.1.0") == []
        out = stop(sim, log)
        assert "10/10 online" in out
        wait_for(
            "every device offline after Ctrl-C",
            lambda: len(devices(api, profile="jetson-xavier", state="offline")) == n or None,
        )


@dataclass(frozen=True)
class BrokerFiles:
    """The fleet CA's files under the names ``start_example`` swaps in."""

    server_cert: Path
    server_key: Path
    ca_file: Path
    crl_file: Path


@pytest.mark.slow
@pytest.mark.broker
def test_enrolled_devices_log_in_with_their_certificates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The shipped mTLS broker config: each device connection logs in with the
    certificate the server signed at enrolment (CN = device id, the ACL's ``%u``), and an
    outage reaches the server as the device's Will."""
    data, crl = tmp_path / "data", tmp_path / "fleet-ca.crl"
    init_signing(data, tmp_path / "offline")
    d = ["--data-dir", str(data)]
    assert fleet_main(["ca", "broker-cert", "--host", "127.0.0.1", *d]) == 0
    assert fleet_main(["ca", "client-cert", "fleet-server", *d]) == 0
    assert fleet_main(["ca", "crl", "--out", str(crl), *d]) == 0  # the broker needs one
    capsys.readouterr()
    b = data / "broker"
    files = BrokerFiles(b / "server.crt", b / "server.key", b / "fleet-ca.crt", crl)
    broker = start_example("mosquitto-mtls.conf", tmp_path / "mosquitto", files, {})  # type: ignore[arg-type]
    broker_url, port = f"mqtts://127.0.0.1:{broker.ports[0]}", free_port()
    clients = data / "clients"
    settings = {
        "mqtt": {
            "ca_file": str(clients / "fleet-ca.crt"),
            "cert_file": str(clients / "fleet-server.crt"),
            "key_file": str(clients / "fleet-server.key"),
        },
        "ca": {"crl_file": str(crl)},
        "validation": {"isolation": "inline"},
    }
    (tmp_path / "server.yaml").write_text(yaml.safe_dump(settings))
    argv = [sys.executable, "-m", "fleet_server.cli", "serve", *d, "--port", str(port)]
    argv += ["--config", str(tmp_path / "server.yaml"), "--mqtt-url", broker_url]
    url = f"http://127.0.0.1:{port}"
    with contextlib.ExitStack() as stack:
        stack.callback(broker.kill)
        proc = stack.enter_context(running(argv, tmp_path / "server.log"))
        wait_for("the server", lambda: _ready(url, proc, tmp_path / "server.log"))
        db = Database(f"sqlite:///{data / 'fleet.db'}")
        srv = Server(url, make_token(db, Role.OPERATOR), data)
        db.dispose()
        log = tmp_path / "sim.log"
        argv = [str(REPO / "scripts" / "simulate-fleet"), "--server", url]
        argv += ["--mqtt", broker_url, "--devices", "12", "--id-prefix", "tls"]
        argv += ["--register", "enrol", "--tag", "site=tls", "--api-token", srv.token]
        argv += ["--interval", "0.5", "--offline-rate", "0.3", "--offline-time", "1.5"]
        argv += ["--poll-interval", "0", "--summary-interval", "1", "--duration", "60"]
        with srv.api() as api, running(argv, log) as sim:
            wait_for(
                "the fleet enrolled and seen",
                lambda: (
                    len([x for x in devices(api, tag="site=tls") if x["last_seen"]]) == 12 or None
                ),
            )
            wait_for("a Will", lambda: devices(api, tag="site=tls", state="offline") or None)
            out = stop(sim, log)
    assert "u'tls-00000'" in broker.log()  # the certificate's CN is the broker identity
    assert "denied" not in broker.log().lower()  # every device stayed in its own topics
    assert "drops 0," not in out.splitlines()[-1]
