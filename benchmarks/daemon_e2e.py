#!/usr/bin/env python3
"""End to end through a real broker: the agent daemon against the floor, in the same run.

Starts its own Mosquitto (127.0.0.1, a free port), ``edge-agent run`` as a subprocess
and ``mqtt_floor.py`` (the least a Python process can do per request, see there) on the
same broker, same models, same intra-op threads, then measures:

1. latency: client publish -> reply received, one request in flight, p50/p99, for
   silero VAD, PP-OCR cls and BlazeFace (a JPEG); agent and floor alternate in rounds so
   that drift hits both; each agent row shows its p50 minus the floor's at the same QoS;
2. throughput at saturation (``--window`` requests in flight), without and with
   micro-batching, against the floor's;
3. overload: requests at twice the agent's unbatched saturation rate for
   ``--overload-s`` seconds; the latency of the ``overloaded`` replies, requests never
   answered, and the agent's RSS sampled every second.

    .venv/bin/python benchmarks/daemon_e2e.py [--threads 1] [--rounds 4]
        [--only latency,throughput,overload] [--seconds 5] [--overload-s 10]

Takes about 2-3 minutes. Figures on a shared or small machine are noisy: compare
agent and floor within one run, not across runs.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from daemon_cases import (
    ETNS,
    OVERLOAD_MODEL,
    BatchCase,
    Case,
    agent_models,
    batch_cases,
    cls_case,
    face_case,
    make_affine,
    vad_case,
)
from daemon_rig import AgentProcess, Broker, FloorProcess, RssSampler, models_dir
from mqtt_load import (
    LoadClient,
    Request,
    RunStats,
    classify_agent,
    classify_floor,
    parse_timing,
    percentile,
    timing_part,
)

from agent.protocol import InferResponse, decode_response

DEVICE = "bench-01"
#: Telemetry every second, so that the overload run can read the agent's own counters.
TELEMETRY_S = 1.0
SECTIONS = ("latency", "throughput", "overload")


def infer_topic(model: str) -> str:
    return f"edge/{DEVICE}/infer/{model}"


# --- 1. latency --------------------------------------------------------------------------


def _outputs_match(agent_reply: bytes | bytearray, floor_reply: bytes | bytearray) -> str:
    """Whether the agent's outputs are the floor's (both flattened, in model order)."""
    reply = decode_response(agent_reply)
    if not isinstance(reply, InferResponse):
        return f"agent error: {reply.code}"
    ours = np.concatenate([t.array.ravel().astype(np.float32) for t in reply.outputs])
    theirs = np.frombuffer(floor_reply, np.float32)
    if ours.shape != theirs.shape:
        return f"shapes differ ({ours.size} vs {theirs.size} values)"
    diff = float(np.max(np.abs(ours - theirs)))
    return f"{'yes' if diff < 1e-3 else 'NO'} (max |diff| {diff:.1e})"


def _inside(stats: RunStats) -> str:
    """The p50 of the agent's own queue and total times, from the replies' ``timing_ms``."""
    parsed = [t for t in map(parse_timing, stats.kept) if t is not None]
    if not parsed:
        return ""
    queue, _inference, total = (np.median(col) for col in zip(*parsed, strict=True))
    return f"{queue:>15.3f} {total:>6.3f}"


#: One latency row to measure: (server, payload label, qos, client, request, per round).
Step = tuple[str, str, int, LoadClient, Request, int]
#: The goal for the agent's p50 over the floor's, in ms.
GOAL_DELTA_MS = 0.3
#: The goal for micro-batching: replies/s over the floor's.
GOAL_BATCHED_X = 3.0
#: The goal for the p50 of ``overloaded`` replies, in ms.
GOAL_REFUSAL_MS = 1.0


def _plan(case: Case, agent: LoadClient, floor: LoadClient) -> list[Step]:
    """Floor at QoS 1 and 0; the agent's first variant at QoS 1 and 0, the others at 1."""
    floor_req = Request(f"floor/{case.floor_spec['name']}", case.floor_payload)
    plan: list[Step] = [
        ("floor", case.floor_label, qos, floor, floor_req, case.floor_per_round) for qos in (1, 0)
    ]
    for i, v in enumerate(case.variants):
        req = Request(infer_topic(case.model), v.payload, v.content_type)
        for qos in (1, 0) if i == 0 else (1,):
            plan.append(("agent", v.label, qos, agent, req, v.per_round))
    return plan


def _measure(plan: list[Step], rounds: int) -> dict[tuple[str, str, int], RunStats]:
    """Warm up every step, then run them in rounds, in alternating order."""
    for _server, _label, qos, client, req, n in plan:
        client.closed(req, qos=qos, count=max(10, n // 10))
    rows: dict[tuple[str, str, int], RunStats] = {}
    for r in range(rounds):
        for server, label, qos, client, req, n in plan[:: 1 if r % 2 == 0 else -1]:
            stats = client.closed(req, qos=qos, count=n)
            rows.setdefault((server, label, qos), RunStats()).extend(stats)
    return rows


def latency(agent: LoadClient, floor: LoadClient, cases: list[Case], rounds: int) -> None:
    print(
        "\n== 1. latency: client publish -> reply received, 1 request in flight; "
        "agent Δp50 vs the floor at the same QoS"
    )
    print(
        "   (in agent: the p50 of the agent's own timing_ms: queue = MQTT message object "
        "built -> worker starts; total = that + run + reply built, before encode and publish)"
    )
    print(
        f"{'model':<12} {'server':<6} {'payload':<14} {'qos':>3} {'n':>5} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'Δp50 ms':>8}   {'in agent: queue':>15} {'total':>6}"
    )
    for case in cases:
        rows = _measure(_plan(case, agent, floor), rounds)
        floor_p50 = {
            qos: percentile(s.latencies("ok"), 50)
            for (server, _, qos), s in rows.items()
            if server == "floor"
        }
        for (server, label, qos), s in rows.items():
            ok = s.latencies("ok")
            p50 = percentile(ok, 50)
            delta, goal = "", ""
            if server == "agent":
                delta = f"{p50 - floor_p50[qos]:+8.3f}"
                if label == case.variants[0].label:
                    met = p50 - floor_p50[qos] <= GOAL_DELTA_MS
                    goal = f"  goal <= +{GOAL_DELTA_MS} ms: {'ok' if met else 'OVER'}"
            bad = {k: v for k, v in s.counts().items() if k != "ok"}
            note = f"  errors {bad}, missing {s.missing}" if bad or s.missing else ""
            print(
                f"{case.label:<12} {server:<6} {label:<14} {qos:>3} {len(ok):>5} "
                f"{p50:>8.3f} {percentile(ok, 99):>8.3f} {delta:>8}   {_inside(s)}{goal}{note}"
            )
        agent_last = rows[("agent", case.variants[0].label, 1)].last_reply
        floor_last = rows[("floor", case.floor_label, 1)].last_reply
        print(f"{'':<12} outputs equal to the floor's: {_outputs_match(agent_last, floor_last)}")


# --- 2. throughput -----------------------------------------------------------------------


def _saturate(client: LoadClient, req: Request, window: int, seconds: float, qos: int) -> RunStats:
    client.closed(req, qos=qos, window=window, seconds=0.5)  # warm-up, fills the pipeline
    return client.closed(req, qos=qos, window=window, seconds=seconds)


def _rate(stats: RunStats, outcome: str = "ok") -> float:
    """Replies with ``outcome`` per second, the first tenth (ramp-up) left out."""
    arrivals = [t for t, o in zip(stats.arrivals, stats.outcomes, strict=True) if o == outcome]
    if len(arrivals) < 2:
        return 0.0
    skip = len(arrivals) // 10  # leave out the ramp-up
    return (len(arrivals) - skip - 1) / (arrivals[-1] - arrivals[skip])


def throughput(
    agent: LoadClient,
    floor: LoadClient,
    cases: list[BatchCase],
    *,
    window: int,
    seconds: float,
    qos: int,
) -> dict[str, float]:
    print(
        f"\n== 2. throughput at saturation: {window} requests in flight (closed loop, "
        f"QoS {qos}), {seconds:g} s each; agent ETNS -> ETNS, floor raw bytes"
    )
    print(
        f"{'model':<22} {'server':<28} {'replies/s':>10} {'x floor':>8} "
        f"{'p50 ms':>8} {'p99 ms':>8} {'errors':>8}"
    )
    rates: dict[str, float] = {}
    for case in cases:
        runs = [
            ("floor", floor, Request(case.floor_topic, case.floor_payload)),
            ("agent, max_batch 1", agent, Request(infer_topic(case.unbatched), case.request, ETNS)),
            (
                f"agent, {case.batching}",
                agent,
                Request(infer_topic(case.batched), case.request, ETNS),
            ),
        ]
        base = 0.0
        for label, client, req in runs:
            stats = _saturate(client, req, window, seconds, qos)
            rate = _rate(stats)
            base = base or rate
            if label == "agent, max_batch 1":
                rates[case.unbatched] = rate
            _tput_row(case.label, label, stats, rate, base)
        met = base > 0 and rate / base >= GOAL_BATCHED_X
        print(
            f"{'':<22} goal: batched >= {GOAL_BATCHED_X:g}x the floor: {'ok' if met else 'NOT MET'}"
        )
    # The agent's intake alone: refusals are answered on the network thread, no worker.
    refused = Request(infer_topic("no-such-model"), cases[-1].request, ETNS)
    stats = _saturate(agent, refused, window, seconds, qos)
    rates["intake"] = _rate(stats, "unknown_model")
    _tput_row("intake ceiling", "agent, unknown_model replies", stats, rates["intake"], 0.0)
    return rates


def _tput_row(model: str, server: str, stats: RunStats, rate: float, base: float) -> None:
    outcome = max(stats.counts(), key=stats.counts().__getitem__, default="ok")
    lat = stats.latencies(outcome)
    errors = stats.received - len(lat) + stats.missing
    ratio = f"{rate / base:>7.2f}x" if base else f"{'':>8}"
    print(
        f"{model:<22} {server:<28} {rate:>10.0f} {ratio} "
        f"{percentile(lat, 50):>8.2f} {percentile(lat, 99):>8.2f} {errors:>8}"
    )


# --- 3. overload -------------------------------------------------------------------------


def overload(
    agent: AgentProcess,
    client: LoadClient,
    payload: bytes,
    rates: dict[str, float],
    seconds: float,
) -> None:
    rate = 2.0 * rates["cls"]
    print(
        f"\n== 3. overload: PP-OCR cls (queue 64, max_batch 1) at {rate:.0f} requests/s "
        f"(2x its measured saturation) for {seconds:g} s, QoS 1, open loop"
    )
    intake = rates.get("intake")
    if intake is not None and rate > intake:
        print(
            f"   note: that is above the agent's measured intake ceiling ({intake:.0f}/s), so "
            "requests back up in the broker; its per-client queue limit then drops them"
        )
    req = Request(infer_topic(OVERLOAD_MODEL), payload, ETNS)
    rss_before = agent.process.memory_info().rss
    with RssSampler(agent.process) as rss:
        t0 = time.perf_counter()
        stats = client.paced(req, qos=1, rate=rate, seconds=seconds)
        send_s = time.perf_counter() - t0
    counts = stats.counts()
    print(
        f"sent {stats.sent} in {seconds:g} s, then a drain: {send_s:.1f} s in all; replies "
        f"{stats.received}: {dict(counts)}; missing (no reply at all) {stats.missing}"
    )
    print(f"   {_agent_counts(agent, OVERLOAD_MODEL, time.perf_counter())}")
    print(f"{'reply':<12} {'n':>6} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for outcome in sorted(counts):
        lat = stats.latencies(outcome)
        print(
            f"{outcome:<12} {len(lat):>6} {percentile(lat, 50):>8.3f} {percentile(lat, 90):>8.3f} "
            f"{percentile(lat, 99):>8.3f} {float(lat.max()):>8.3f}"
        )
    refused = stats.latencies("overloaded")
    fast = len(refused) > 0 and percentile(refused, 50) < GOAL_REFUSAL_MS
    print(
        f"goals: overloaded p50 < {GOAL_REFUSAL_MS:g} ms: {'ok' if fast else 'NOT MET'}; "
        f"nothing unanswered: {'ok' if stats.missing == 0 else 'NOT MET'}"
    )
    mib = [s / 2**20 for s in rss.samples]
    print(
        f"agent RSS: {rss_before / 2**20:.1f} MiB before; during ({len(mib)} samples, 1/s) "
        f"min {min(mib):.1f} max {max(mib):.1f} last {mib[-1]:.1f} MiB"
    )


def _agent_counts(agent: AgentProcess, model: str, after: float) -> str:
    """What the agent's next telemetry says it answered for ``model`` (requests that the
    client sent but the agent never counted were lost before it: in the broker)."""
    watcher, proc = agent.watcher, agent.process
    assert watcher is not None
    seen = watcher.wait_for(
        lambda s: s.topic.endswith("/telemetry") and s.at > after, 5.0, proc.is_running
    )
    if seen is None:
        return "agent telemetry: none within 5 s"
    doc = seen.doc.get("models", {}).get(model, {})
    return f"the agent's own telemetry: {doc.get('requests')} answered, errors {doc.get('errors')}"


# --- main --------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads (both sides)")
    parser.add_argument("--rounds", type=int, default=4, help="latency rounds (alternating)")
    parser.add_argument("--only", default=",".join(SECTIONS), help="sections to run")
    parser.add_argument("--seconds", type=float, default=5.0, help="per throughput run")
    parser.add_argument("--window", type=int, default=64, help="requests in flight")
    parser.add_argument("--tput-qos", type=int, default=1, choices=(0, 1))
    parser.add_argument("--overload-s", type=float, default=10.0)
    args = parser.parse_args()
    sections = set(args.only.split(","))
    models = models_dir()
    with tempfile.TemporaryDirectory(prefix="daemon-e2e-") as tmp:
        work = Path(tmp)
        affine = make_affine(work / "affine.onnx")
        cases = [vad_case(models), cls_case(models), face_case(models)]
        tput_cases, extra_specs = batch_cases(affine)
        broker = Broker(work / "broker").start()
        agent = AgentProcess(
            work / "agent",
            broker,
            agent_models(models, work, affine),
            threads=args.threads,
            device_id=DEVICE,
            telemetry_interval_s=TELEMETRY_S,
        )
        floor = FloorProcess(
            broker, [c.floor_spec for c in cases] + extra_specs, threads=args.threads
        )
        try:
            started = agent.start()
            floor.start()
            print(
                f"agent pid {agent.pid}: online {started.online_s * 1000:.0f} ms, "
                f"{len(agent_models(models, work, affine))} models ready "
                f"{started.ready_s * 1000:.0f} ms after start; floor pid {floor.pid}; "
                f"intra-op threads {args.threads}; broker {broker.url}"
            )
            agent_client = LoadClient(broker.port, classify_agent, timing_part)
            floor_client = LoadClient(broker.port, classify_floor)
            if "latency" in sections:
                latency(agent_client, floor_client, cases, args.rounds)
            rates: dict[str, float] = {}
            if "throughput" in sections:
                rates = throughput(
                    agent_client,
                    floor_client,
                    tput_cases,
                    window=args.window,
                    seconds=args.seconds,
                    qos=args.tput_qos,
                )
            if "overload" in sections:
                cls = tput_cases[0]
                if "cls" not in rates:
                    req = Request(infer_topic(cls.unbatched), cls.request, ETNS)
                    rates["cls"] = _rate(_saturate(agent_client, req, args.window, 3.0, 1))
                overload(agent, agent_client, cls.request, rates, args.overload_s)
            dropped = broker.dropped_lines()
            if dropped:
                print(f"broker dropped messages: {dropped[:3]}")
        finally:
            code = agent.stop()
            floor.stop()
            broker.stop()
        print(f"agent exit code after SIGTERM: {code}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
