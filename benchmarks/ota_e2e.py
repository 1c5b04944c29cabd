"""OTA figures of issue 5, measured on real processes: ``edge-fleet serve`` (SQLite), Mosquitto
with the shipped mTLS config and ACL, and three enrolled ``edge-agent run`` processes, set up
by the end-to-end tests' rig (``tests/e2e/rig.py``).

    .venv/bin/python benchmarks/ota_e2e.py [--only swap,rollout,stage] [--rate 50]
                                           [--probation 10] [--size-mb 100]

(a) **swap under load**: ``--rate`` requests/s (PP-OCR text-direction, a PNG each) to one
    agent while a rollout updates that agent's model: failed and unanswered requests, p99 in
    steady state, p99 of the requests sent within 1 s of the hot swap (from the ``activating``
    to the ``probation`` event), and over the whole update (``downloading`` to ``committed``).
(b) **rollout create -> every device committed**, for the 3 agents: from just before
    ``edge-fleet rollout create`` to the last ``committed`` event on the broker, and to the
    server showing the rollout ``completed``; waves ``100%`` and ``1,100%``, with the agents'
    probation at 0 s and at ``--probation`` s. The server's engine ticks every 2 s.
(c) **verify and stage a ``--size-mb`` artifact** on an agent: download from the server and
    store (``downloading`` -> ``verifying`` event), then ``verify_length_and_hashes`` on the
    stored file (``verifying`` -> ``validating``), against this machine's raw sha256 speed
    (hashlib over the same number of bytes in memory, in this run).

Prints a table; asserts nothing. About 2-3 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from demo_bundles import text_direction_bundle, text_png  # noqa: E402
from fetch_models import cache_root, fetch  # noqa: E402

from tests.agent.updater_models import scale_model  # noqa: E402
from tests.e2e.operator import Operator  # noqa: E402
from tests.e2e.rig import APP, FAST_UPDATES, AgentSpec, FleetRig  # noqa: E402
from tests.e2e.traffic import Traffic  # noqa: E402
from tests.e2e.watch import UpdateEvent, Watcher  # noqa: E402

DEVICES = ["bench-1", "bench-2", "bench-3"]
TEXT = "text-direction"
Row = tuple[str, str]


def ms(seconds: list[float], pct: float) -> float:
    return float(np.percentile(np.array(seconds) * 1000, pct)) if seconds else float("nan")


def event(watcher: Watcher, device: str, version: str, state: str, since: float) -> UpdateEvent:
    return watcher.wait_event(
        device, lambda e: e.to_version == version and e.state == state, 120, since
    )


def event_ts(e: UpdateEvent) -> float:
    return datetime.fromisoformat(str(e.doc["ts"]).replace("Z", "+00:00")).timestamp()


class Bench:
    """The fleet and the figures."""

    def __init__(self, rig: FleetRig, models: Path, work: Path, args: argparse.Namespace) -> None:
        self.rig, self.ops, self.args = rig, Operator(rig), args
        self.models, self.work = models, work
        self.rows: list[Row] = []
        self.releases = 0
        assert rig.watcher is not None
        self.watcher = rig.watcher

    def release(self) -> str:
        """Push the next text-direction version (same weights, a new manifest version)."""
        self.releases += 1
        version = f"1.{self.releases}.0"
        self.ops.push(text_direction_bundle(self.models, self.work / "bundles", version))
        return version

    def restart_agents(self, probation_s: float) -> None:
        for device in DEVICES:
            self.rig.agents[device].stop()

            def change(doc: dict[str, object], p: float = probation_s) -> None:
                updates = doc["updates"]
                assert isinstance(updates, dict)
                updates["probation_s"] = p

            self.rig.edit_agent_config(device, change)
            self.rig.start_agent(device)
        for device in DEVICES:
            self.rig.wait_online(device)
        time.sleep(1)  # the retained statuses of the restart settle

    # --- (a) ---------------------------------------------------------------------------

    def swap_under_load(self, traffic: Traffic) -> None:
        device, rate = DEVICES[0], self.args.rate
        version = self.release()
        load = traffic.load([device], TEXT, text_png("edge fleet"), rate, "image/png")
        time.sleep(12)  # 2 s of warm-up, then 10 s of steady state
        created = time.perf_counter()
        rid = self.ops.create_rollout(TEXT, version, "--device", device, "--waves", "100%")
        activating = event(self.watcher, device, version, "activating", created)
        probation = event(self.watcher, device, version, "probation", created)
        committed = event(self.watcher, device, version, "committed", created)
        time.sleep(1)
        outcomes = load.stop()
        self.ops.wait_rollout(rid, "completed", 30)
        started = event(self.watcher, device, version, "downloading", created).at

        def p99(lo: float, hi: float) -> tuple[float, int]:
            lat = [o.latency_s for o in outcomes if lo <= o.sent_at < hi and o.latency_s]
            return ms(lat, 99), len(lat)

        steady, n_steady = p99(created - 10, created)
        swap, n_swap = p99(activating.at - 1, probation.at + 1)
        whole, n_whole = p99(started, committed.at)
        failed = sum(o.result not in ("ok", "unanswered") for o in outcomes)
        lost = sum(o.result == "unanswered" for o in outcomes)
        versions = sorted({o.version for o in outcomes if o.version})
        self.rows += [
            (f"(a) swap under load: {rate:g} req/s to {device}, {TEXT} PNG", ""),
            ("    requests sent / failed / unanswered", f"{len(outcomes)} / {failed} / {lost}"),
            ("    versions that answered", ", ".join(versions)),
            (f"    p99 steady state ({n_steady} requests)", f"{steady:.1f} ms"),
            (f"    p99 within 1 s of the swap ({n_swap})", f"{swap:.1f} ms ({swap / steady:.2f}x)"),
            (f"    p99 download to commit ({n_whole})", f"{whole:.1f} ms ({whole / steady:.2f}x)"),
        ]

    # --- (b) ---------------------------------------------------------------------------

    def rollout_time(self, waves: str, probation_s: float) -> None:
        version = self.release()
        t0 = time.perf_counter()
        rid = self.ops.create_rollout(
            TEXT, version, "--target", "site=berlin", "--waves", waves, "--probation", "10m"
        )
        last = max(event(self.watcher, d, version, "committed", t0).at for d in DEVICES)
        done = self.ops.wait_rollout(rid, "completed", 120)
        server = time.perf_counter() - t0
        assert done["totals"] == {"committed": len(DEVICES)}, done
        label = f"    waves {waves}, agents' probation {probation_s:g} s"
        self.rows.append((label, f"{last - t0:.1f} s (completed on the server: {server:.1f} s)"))

    # --- (c) ---------------------------------------------------------------------------

    def stage(self) -> None:
        size = self.args.size_mb * 2**20
        device = DEVICES[0]
        big = scale_model(self.work / "big" / "big.onnx", 2.0, pad_bytes=size)
        self.ops.push(big, "--name", "big", "--version", "2.0.0")
        t0 = time.perf_counter()
        self.ops.create_rollout("big", "2.0.0", "--device", device, "--waves", "100%")
        states = ("downloading", "verifying", "validating", "committed")
        at = [event_ts(event(self.watcher, device, "2.0.0", s, t0)) for s in states]
        fetch_s, verify_s = at[1] - at[0], at[2] - at[1]
        length = big.stat().st_size
        data = os.urandom(length)
        raw = min(_timed(lambda: hashlib.sha256(data).digest()) for _ in range(3))
        mb = length / 2**20
        self.rows += [
            (f"(c) verify and stage {mb:.0f} MiB on {device}", ""),
            ("    download + store (HTTP, fsync, rename)", _rate(fetch_s, mb)),
            ("    verify_length_and_hashes (sha256)", _rate(verify_s, mb)),
            ("    raw hashlib.sha256 here, in memory", _rate(raw, mb)),
        ]


def _rate(seconds: float, mib: float) -> str:
    return f"{seconds:.2f} s ({mib / seconds:.0f} MiB/s)"


def _timed(action: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    action()
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="swap,rollout,stage", help="which figures (a comma list)")
    p.add_argument("--rate", type=float, default=50.0, help="requests/s for (a)")
    p.add_argument("--probation", type=float, default=10.0, help="agents' probation for (b)")
    p.add_argument("--size-mb", type=int, default=100, help="artifact size for (c)")
    args = p.parse_args()
    only = set(args.only.split(","))
    models = fetch(cache_root() / "models")
    with tempfile.TemporaryDirectory(prefix="ota-e2e-") as tmp:
        work = Path(tmp)
        start = text_direction_bundle(models, work / "bundles", "1.0.0")
        small = scale_model(work / "big-1" / "big.onnx", 1.0)
        updates = {**FAST_UPDATES, "probation_s": args.probation, "max_latency_ratio": 2.0}
        models_cfg = [{"name": TEXT, "path": str(start)}, {"name": "big", "path": str(small)}]
        specs = [AgentSpec(d, models=models_cfg, updates=updates) for d in DEVICES]
        rig = FleetRig(work / "fleet")
        try:
            rig.start()
            rig.enrol_agents(specs)
            bench = Bench(rig, models, work, args)
            if "swap" in only:
                traffic = Traffic(rig.mqtt_port, rig.identity(APP).tls(), APP)
                try:
                    bench.swap_under_load(traffic)
                finally:
                    traffic.close()
            if "rollout" in only:
                bench.rows.append(("(b) rollout create -> all 3 agents committed", ""))
                for waves in ("100%", "1,100%"):
                    bench.rollout_time(waves, args.probation)
                bench.restart_agents(0)
                for waves in ("100%", "1,100%"):
                    bench.rollout_time(waves, 0)
            if "stage" in only:
                bench.stage()
        finally:
            rig.close()
    width = max(len(r[0]) for r in bench.rows) + 2
    print(f"\nOTA end to end, {time.strftime('%Y-%m-%d')}, {os.cpu_count()} cores")
    for label, value in bench.rows:
        print(f"{label:<{width}}{value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
