#!/usr/bin/env python3
"""The agent daemon at rest: start-up time, idle memory and idle CPU, on a real broker.

Starts its own Mosquitto (127.0.0.1, a free port) and ``edge-agent run`` with one small
model (silero VAD by default), telemetry at its default 10 s, the profile the agent
detects (as shipped) unless ``--threads`` pins the intra-op threads. It measures:

1. start-up, ``--starts`` times (a fresh process and device id each): from ``Popen`` to
   the retained status ``online``, and to every model ``ready`` (a subscriber that was
   there before the process started timestamps both);
2. idle, for ``--idle-s`` seconds on the last one: CPU (``psutil`` ``cpu_times`` delta,
   user + system, in % of one core), RSS and USS sampled every second, context switches
   (wake-ups), threads, and the telemetry messages it sent meanwhile.

    .venv/bin/python benchmarks/daemon_idle.py [--idle-s 30] [--starts 3] [--model PATH]

Takes about 45 s. Goals: online <= 1 s, RSS <= 80 MB, CPU < 1 % of a core.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon_rig import AgentProcess, Broker, ModelEntry, StartTimes, models_dir

MB = 1_000_000
GOAL_ONLINE_S = 1.0
GOAL_RSS_MB = 80
GOAL_CPU_PCT = 1.0


def _verdict(ok: bool) -> str:
    return "ok" if ok else "OVER GOAL"


def startups(
    work: Path, broker: Broker, model: ModelEntry, args: argparse.Namespace
) -> AgentProcess:
    """Start the agent ``args.starts`` times; print each; return the last one, running."""
    print(f"== start-up: Popen -> retained status, {args.starts} fresh processes")
    print(f"{'run':>3} {'online ms':>10} {'ready ms':>10}")
    times: list[StartTimes] = []
    agent: AgentProcess | None = None
    for i in range(args.starts):
        if agent is not None:
            agent.stop()
        agent = AgentProcess(
            work / f"agent-{i}",
            broker,
            [model],
            threads=args.threads,
            device_id=f"bench-idle-{i}",
        )
        times.append(agent.start())
        print(f"{i + 1:>3} {times[-1].online_s * 1000:>10.0f} {times[-1].ready_s * 1000:>10.0f}")
    assert agent is not None
    online = statistics.median(t.online_s for t in times)
    ready = statistics.median(t.ready_s for t in times)
    print(
        f"median: online {online * 1000:.0f} ms ({_verdict(online <= GOAL_ONLINE_S)}, goal "
        f"<= {GOAL_ONLINE_S * 1000:.0f} ms), every model ready {ready * 1000:.0f} ms"
    )
    return agent


def idle(agent: AgentProcess, seconds: float, settle_s: float) -> None:
    """Sample the running agent for ``seconds`` and print what it used."""
    print(
        f"\n== idle: {seconds:g} s after {settle_s:g} s to settle, pid {agent.pid}, "
        "telemetry every 10 s (default)"
    )
    proc = agent.process
    time.sleep(settle_s)
    watcher = agent.watcher
    assert watcher is not None
    tele_before = len(watcher.telemetry())
    cpu0, ctx0, t0 = proc.cpu_times(), proc.num_ctx_switches(), time.perf_counter()
    rss: list[int] = []
    uss: list[int] = []
    while time.perf_counter() - t0 < seconds:
        info = proc.memory_full_info()
        rss.append(int(info.rss))
        uss.append(int(info.uss))
        time.sleep(max(0.0, 1.0 - (time.perf_counter() - t0) % 1.0))
    cpu1, ctx1, t1 = proc.cpu_times(), proc.num_ctx_switches(), time.perf_counter()
    wall = t1 - t0
    busy = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    cpu_pct = busy / wall * 100
    wakeups = (ctx1.voluntary - ctx0.voluntary + ctx1.involuntary - ctx0.involuntary) / wall
    telemetry = watcher.telemetry()
    print(
        f"CPU: {busy * 1000:.0f} ms in {wall:.1f} s = {cpu_pct:.2f} % of one core "
        f"({_verdict(cpu_pct < GOAL_CPU_PCT)}, goal < {GOAL_CPU_PCT:g} %); "
        f"{wakeups:.1f} context switches/s; {proc.num_threads()} threads"
    )
    print(
        f"RSS: max {max(rss) / MB:.1f} MB, last {rss[-1] / MB:.1f} MB "
        f"({_verdict(max(rss) <= GOAL_RSS_MB * MB)}, goal <= {GOAL_RSS_MB} MB); "
        f"USS (private) max {max(uss) / MB:.1f} MB; {len(rss)} samples"
    )
    if telemetry:
        system = telemetry[-1].doc.get("system", {})
        reported = system.get("agent_rss_bytes")
        shown = f"{reported / MB:.1f} MB" if isinstance(reported, int | float) else "n/a"
        print(
            f"telemetry: {len(telemetry) - tele_before} messages during the idle window, "
            f"{len(telemetry)} in all; the last one reports agent_rss {shown}"
        )
    else:
        print("telemetry: none received")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--idle-s", type=float, default=30.0)
    parser.add_argument("--settle-s", type=float, default=3.0)
    parser.add_argument("--starts", type=int, default=3)
    parser.add_argument("--model", type=Path, help="default: silero_vad.onnx")
    parser.add_argument("--threads", type=int, help="pin intra-op threads (default: profile)")
    args = parser.parse_args()
    path = args.model or models_dir() / "silero_vad.onnx"
    model = ModelEntry(path.stem.replace(" ", "_")[:64], path)
    with tempfile.TemporaryDirectory(prefix="daemon-idle-") as tmp:
        work = Path(tmp)
        broker = Broker(work / "broker").start()
        agent: AgentProcess | None = None
        try:
            print(f"model {path.name}; broker {broker.url}\n")
            agent = startups(work, broker, model, args)
            idle(agent, args.idle_s, args.settle_s)
        finally:
            code = agent.stop() if agent is not None else None
            broker.stop()
        print(f"agent exit code after SIGTERM: {code}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
