#!/usr/bin/env python3
"""The one-command demo: a small fleet on this machine, updated by a canary rollout.

Run it through ``scripts/demo`` (which installs what is missing first). In a fresh temp dir:

1. the fleet server's signing keys (the root keys go to an "offline" folder), its device CA,
   and an admin API token: the dashboard's login token;
2. a broker: Mosquitto on a free port, or amqtt (MQTT 3.1.1) where Mosquitto is missing;
3. ``edge-fleet serve``: SQLite, local artifacts, the MQTT ingest, the dashboard at ``/``;
4. three agents with simulated profiles (generic-x86_64, raspberry-pi-5, jetson-orin, set
   in their configs), enrolled with ``edge-agent enroll``, serving the real text-direction
   (ONNX) and face (TFLite) bundles. The Jetson reports ``degraded``: this machine has no
   TensorRT or CUDA, so its models fell back to the CPU, and the status says so;
5. release v1 (text-direction 1.0.0, what the devices run) pushed and rolled out;
6. a canary rollout of v2 (text-direction 2.0.0, waves ``1,100%``), followed to the end;
7. requests over MQTT; then the dashboard URL, the login token and one-liners to try.

It then runs until Ctrl-C (``--once``: exits after step 7), stops everything it started and
checks that nothing is left running. ``--devices N`` adds N simulated devices
(``scripts/simulate-fleet``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from demo_bundles import face_bundle, face_jpeg, text_direction_bundle, text_png  # noqa: E402
from demo_fleet import (  # noqa: E402
    VENV_BIN,
    Broker,
    DemoError,
    Processes,
    edge_fleet,
    enroll,
    free_port,
    start_broker,
)
from fetch_models import cache_root, fetch  # noqa: E402

#: (device id, the profile its config sets)
DEVICES = [
    ("cam-x86", "generic-x86_64"),
    ("cam-pi5", "raspberry-pi-5"),
    ("cam-orin", "jetson-orin"),
]
SIMULATOR = REPO / "scripts" / "simulate-fleet"


def say(text: str) -> None:
    print(f"\033[1m==> {text}\033[0m", flush=True)


def shell(cmd: str, output: str = "") -> None:
    """Show a command as typed, and what it printed."""
    print(f"    $ {cmd}")
    for line in output.strip().splitlines():
        print(f"      {line}")


class Demo:
    """The demo's state: the work dir, its processes, the server and the broker."""

    def __init__(self, args: argparse.Namespace, work: Path) -> None:
        self.args = args
        self.work = work
        self.procs = Processes(work / "logs")
        self.data = work / "fleet-data"
        self.port = args.port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token = ""
        self.broker: Broker | None = None

    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1{path}`` with the admin token."""
        headers = {"Authorization": f"Bearer {self.token}"}
        r = httpx.get(f"{self.url}/api/v1{path}", params=params, headers=headers, timeout=10)
        r.raise_for_status()
        return r.json()

    def wait(self, what: str, check: Callable[[], Any], timeout: float) -> Any:
        """The first truthy ``check()``; DemoError when a process exits or after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.procs.check()
            result = check()
            if result:
                return result
            time.sleep(0.25)
        raise DemoError(
            f"timed out after {timeout:g} s waiting for {what} (logs: {self.work}/logs)"
        )

    # --- the steps -------------------------------------------------------------------------

    def signing(self) -> None:
        say(f"1/7 the fleet server's keys, CA and an admin token (in {self.work})")
        d = ["--data-dir", str(self.data)]
        offline = self.work / "offline-root-keys"
        edge_fleet("keys", "init", "--offline-dir", str(offline), *d)
        shell(f"edge-fleet keys init --offline-dir {offline.name} --data-dir {self.data.name}")
        edge_fleet("ca", "init", *d)
        shell(f"edge-fleet ca init --data-dir {self.data.name}")
        self.token = edge_fleet("token", "create", "--role", "admin", "--name", "demo", *d).strip()
        shell(f"edge-fleet token create --role admin --name demo --data-dir {self.data.name}")

    def start_broker(self) -> Broker:
        self.broker = start_broker(self.procs, self.work, self.args.broker)
        note = ""
        if self.broker.kind == "amqtt":
            why = "as asked" if self.args.broker == "amqtt" else "Mosquitto is not installed"
            note = f" (MQTT 3.1.1: {why})"
        say(f"2/7 broker: {self.broker.kind} on {self.broker.url}{note}")
        return self.broker

    def start_server(self, broker: Broker) -> None:
        say(f"3/7 edge-fleet serve on {self.url} (SQLite, local artifacts, ingest from the broker)")
        config = {
            "enrolment": {"broker_url": broker.url},
            "ingest": {"flush_interval_ms": 100},
            "telemetry": {"interval_s": 5},
            # amqtt lets an MQTT 5 CONNECT hang until the keep-alive runs out instead of
            # refusing it, so the clients are told the version rather than finding out
            "mqtt": {"protocol": broker.mqtt_setting},
        }
        (self.work / "server.yaml").write_text(yaml.safe_dump(config))
        argv = [str(VENV_BIN / "edge-fleet"), "serve", "--data-dir", str(self.data)]
        argv += ["--config", str(self.work / "server.yaml"), "--port", str(self.port)]
        self.procs.start("server", [*argv, "--mqtt-url", broker.url, "--log-level", "warning"])
        self.procs.wait_port("server", self.port, timeout=60)
        self.wait("the server", lambda: httpx.get(f"{self.url}/readyz").status_code == 200, 60)
        os.environ.update(EDGE_FLEET_URL=self.url, EDGE_FLEET_TOKEN=self.token)
        print(f"    dashboard    {self.url}/")
        print(f"    login token  {self.token}")

    def start_agents(self, broker: Broker, bundles: dict[str, Path]) -> None:
        say("4/7 three agents: enrolled with edge-agent enroll, then edge-agent run")
        probation = 3.0 if self.args.once else self.args.probation
        for device, profile in DEVICES:
            folder = self.work / device
            folder.mkdir()
            token = edge_fleet("device", "token", "--tags", "site=demo").strip()
            config = {
                "profile": profile,
                "mqtt": {"protocol": broker.mqtt_setting, "reconnect": {"max_s": 2.0}},
                "models": [
                    {"name": "text-direction", "path": str(bundles["text-direction"])},
                    {"name": "face", "path": str(bundles["face"])},
                ],
                "telemetry": {"interval_s": 5},
                "updates": {"poll_interval_s": 60, "min_check_interval_s": 0.5,
                            "probation_s": probation, "probation_check_s": 0.5},
            }  # fmt: skip
            (folder / "agent.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
            enroll(self.url, token, device, folder / "agent.yaml", folder / "state")
            run = [str(VENV_BIN / "edge-agent"), "run", "--config", str(folder / "agent.yaml")]
            self.procs.start(device, run)
        shell(f"edge-agent enroll --server {self.url} --device-id cam-x86 (and 2 more)")

        def up() -> list[dict[str, Any]] | None:
            items: list[dict[str, Any]] = self.api("/devices", tag="site=demo")["items"]
            ready = [
                d for d in items
                if d["state"] in ("online", "degraded") and len(d["models"]) == 2
                and all(m["state"] in ("ready", "failed") for m in d["models"])
            ]  # fmt: skip
            return items if len(ready) == len(DEVICES) else None

        for d in self.wait("the agents to be up", up, 90):
            models = ", ".join(
                f"{m['name']} {m['version']} on {m['provider']}" for m in d["models"]
            )
            print(f"    {d['id']:<9} {d['profile']:<15} {d['state']:<9} {models}")

    def rollout(self, version: str, bundle: Path, *flags: str) -> int:
        """Push ``bundle``, roll text-direction ``version`` out, print its progress until it
        ends; its id."""
        out = edge_fleet("model", "push", str(bundle))
        shell(f"edge-fleet model push {bundle.name}", out)
        argv = ["rollout", "create", "--model", f"text-direction@{version}"]
        argv += ["--target", "site=demo", *flags]
        rollout = int(json.loads(edge_fleet(*argv, "--json"))["id"])
        shell(f"edge-fleet {' '.join(argv)}", f"rollout {rollout} created")
        seen = None
        while True:
            self.procs.check()
            r = self.api(f"/rollouts/{rollout}")
            now = (r["state"], r["current_wave"], r["totals"])
            if now != seen:
                counts = ", ".join(f"{n} {s}" for s, n in sorted(r["totals"].items()))
                wave = f"wave {r['current_wave'] + 1} of {len(r['wave_sizes'])}"
                if r["current_wave"] < 0:
                    wave = "waiting for the engine's next tick"
                print(f"      rollout {rollout}: {r['state']}, {wave}: {counts}", flush=True)
                seen = now
            if r["state"] not in ("running", "rolling_back"):
                return rollout
            time.sleep(0.5)

    def requests(self, broker: Broker, face: Path | None) -> None:
        say("7/7 requests over MQTT to cam-x86")
        argv = [sys.executable, str(REPO / "scripts" / "demo_client.py"), "--port"]
        argv += [str(broker.port), "--device", "cam-x86", "--mqtt", broker.protocol, "--tour"]
        subprocess.run([*argv, *(["--face", str(face)] if face else [])], check=True, timeout=120)

    def try_it(self, broker: Broker, face: Path | None) -> None:
        image = face or self.work / "upside-down.png"
        model = "face" if face else "text-direction"
        p, v = broker.port, "" if broker.protocol == "5" else " --mqtt 3.1.1"
        print("\nTry it yourself:")
        print(f"  dashboard     {self.url}/   (log in with the token below)")
        print(f"  login token   {self.token}")
        print(f"  python        .venv/bin/python scripts/demo_client.py --port {p}"
              f" --device cam-x86 --image {image} --model {model}{v}")  # fmt: skip
        if shutil.which("mosquitto_pub"):
            t = f"edge/cam-x86/infer/{model}"
            print(f"  mosquitto     mosquitto_sub -p {p} -t {t}/reply -C 1 -W 10 & sleep 0.5;"
                  f" mosquitto_pub -p {p} -t {t} -f {image}; wait")  # fmt: skip
        print(f"  fleet CLI     export EDGE_FLEET_URL={self.url} EDGE_FLEET_TOKEN={self.token}")
        print("                .venv/bin/edge-fleet device list; .venv/bin/edge-fleet rollout list")
        print(f"  logs          {self.work}/logs/")

    def simulate(self, broker: Broker, count: int) -> None:
        if not SIMULATOR.exists():
            print(f"\n--devices {count}: not available yet (scripts/simulate-fleet is missing)")
            return
        argv = [str(SIMULATOR), "--server", self.url, "--mqtt", broker.url]
        argv += ["--devices", str(count), "--model", "text-direction@1.0.0", "--interval", "10"]
        self.procs.start("simulate-fleet", argv)
        print(f"\n{count} simulated devices joining (log: {self.work}/logs/simulate-fleet.log);")
        print("roll v2 out to the whole fleet and watch it on the dashboard:")
        print("  .venv/bin/edge-fleet rollout create --model text-direction@2.0.0 --all-devices"
              " --waves 1%,10%,100% --probation 5m")  # fmt: skip

    def run(self) -> int:
        models = fetch(cache_root() / "models")
        self.signing()
        broker = self.start_broker()
        self.start_server(broker)
        bundles = {
            "text-direction": text_direction_bundle(models, self.work / "bundles", "1.0.0"),
            "face": face_bundle(models, self.work / "bundles", "1.0.0"),
        }
        (self.work / "upside-down.png").write_bytes(text_png("hello world", upside_down=True))
        photo = face_jpeg()
        face = self.work / "astronaut.jpg" if photo else None
        if face is not None and photo is not None:
            face.write_bytes(photo)
        self.start_agents(broker, bundles)
        say("5/7 release v1: text-direction 1.0.0 (what the devices run), to every device")
        self.rollout("1.0.0", bundles["text-direction"], "--waves", "100%")
        say("6/7 a canary rollout of v2: text-direction 2.0.0, one device first, then all")
        v2 = text_direction_bundle(models, self.work / "bundles", "2.0.0")
        canary = ["--waves", "1,100%", "--max-failure", "50%", "--min-devices", "1"]
        rollout = self.rollout("2.0.0", v2, *canary, "--probation", "5m", "--auto-rollback")
        print(edge_fleet("rollout", "show", str(rollout)).rstrip())
        self.requests(broker, face)
        self.try_it(broker, face)
        if self.args.devices:
            self.simulate(broker, self.args.devices)
        if self.args.once:
            return 0
        print("\nRunning. Ctrl-C stops everything the demo started.", flush=True)
        while True:
            self.procs.check()
            time.sleep(1)


def _interrupted(*_: object) -> None:
    raise KeyboardInterrupt  # SIGTERM stops the demo as Ctrl-C does


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--once", action="store_true", help="exit after the scripted part")
    parser.add_argument("--devices", type=int, default=0, help="add N simulated devices")
    parser.add_argument("--broker", choices=["auto", "mosquitto", "amqtt"], default="auto")
    parser.add_argument("--port", type=int, default=0, help="the server's port (default: free)")
    parser.add_argument("--probation", type=float, default=10.0, help="agents' probation (s)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir at the end")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="edge-fleet-demo-"))
    demo = Demo(args, work)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupted)
    code = 0
    try:
        code = demo.run()
    except KeyboardInterrupt:
        code = 130
    except DemoError as exc:
        print(f"demo: {exc}", file=sys.stderr)
        code = 1
    finally:
        left = demo.procs.stop_all()  # first: printing can fail once the terminal is gone
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        with contextlib.suppress(OSError):
            say("stopped everything the demo started")
            for what in left:
                print(f"    was left running, killed: {what}")
            print("    nothing left running" if not left else "", flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
