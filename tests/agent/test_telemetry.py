"""Telemetry: the latency histogram, per-model stats, system gauges, the document, Prometheus."""

from __future__ import annotations

import json
import math
import re
import shutil
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.errors import ConfigError
from agent.profiles import load_profile
from agent.protocol.documents import TelemetryDocument, decode_document
from agent.telemetry import (
    AgentStats,
    LatencyHistogram,
    ModelGauge,
    ModelStats,
    SystemCollector,
    TelemetryCollector,
)
from agent.telemetry.histogram import (
    BUCKETS,
    RELATIVE_ERROR,
    HistogramSnapshot,
    bucket_bounds_ms,
    bucket_index,
)
from agent.telemetry.outbox import Outbox
from tests.agent.fixtures.fake_machine import FakeMachine

# --- histogram -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "samples",
    [
        np.random.default_rng(1).lognormal(mean=1.0, sigma=1.2, size=20_000),  # ms, long tail
        np.random.default_rng(2).uniform(0.05, 40.0, size=5_000),
        np.random.default_rng(3).exponential(250.0, size=3_001),
        np.array([7.5] * 99 + [900.0]),
    ],
    ids=["lognormal", "uniform", "exponential", "spike"],
)
def test_percentiles_match_numpy_within_the_bucket_error(samples: np.ndarray) -> None:
    hist = LatencyHistogram()
    for value in samples.tolist():
        hist.record(value)
    ps = [0.0, 1.0, 25.0, 50.0, 90.0, 95.0, 99.0, 99.9, 100.0]
    got = hist.percentiles(ps)
    # Nearest rank, the definition the histogram implements.
    want = np.percentile(samples, ps, method="inverted_cdf")
    for p, g, w in zip(ps, got, want, strict=True):
        assert g is not None
        assert abs(g - w) <= w * RELATIVE_ERROR + 1e-9, f"p{p}: {g} vs {w}"
    assert hist.count == len(samples)
    snap = hist.snapshot()
    assert snap.sum_ms == pytest.approx(float(samples.sum()))
    assert (snap.min_ms, snap.max_ms) == (float(samples.min()), float(samples.max()))


@given(st.floats(min_value=0.001, max_value=60_000.0))
def test_every_value_lands_in_the_bucket_that_bounds_it(value_ms: float) -> None:
    index = bucket_index(value_ms)
    lower, upper = bucket_bounds_ms(index)
    assert lower <= value_ms * (1 + 1e-12) and value_ms < upper * (1 + 1e-12)
    assert (upper - lower) / lower <= 2 * RELATIVE_ERROR + 1e-12
    middle = (lower + upper) / 2
    assert abs(middle - value_ms) <= value_ms * RELATIVE_ERROR * (1 + 1e-9)
    hist = LatencyHistogram()
    hist.record(value_ms)
    assert hist.snapshot().counts[index] == 1  # record() inlines the same arithmetic


def test_buckets_tile_the_range_without_gaps() -> None:
    assert bucket_bounds_ms(0)[0] == 0.001
    for i in range(1, BUCKETS):
        assert bucket_bounds_ms(i)[0] == pytest.approx(bucket_bounds_ms(i - 1)[1], rel=1e-12)
    assert bucket_bounds_ms(BUCKETS - 1)[1] > 60_000.0


def test_out_of_range_values_are_clamped_and_percentiles_stay_true() -> None:
    hist = LatencyHistogram()
    for value in (-3.0, math.nan, 0.0, 0.0002, 120_000.0):
        hist.record(value)
    snap = hist.snapshot()
    assert snap.counts[0] == 4 and snap.counts[BUCKETS - 1] == 1
    p0, p50, p90, p100 = snap.percentiles([0, 50, 90, 100])
    assert (p0, p100) == (0.0, 120_000.0)  # the extremes are exact
    assert p50 is not None and 0.0 <= p50 <= bucket_bounds_ms(0)[1]
    assert p90 == 120_000.0  # in the overflow bucket: the true maximum, not a bucket middle
    assert snap.sum_ms == pytest.approx(120_000.0002)  # negative and NaN count as 0


def test_empty_histogram_and_bad_percentiles() -> None:
    hist = LatencyHistogram()
    assert hist.percentiles([50, 99]) == [None, None]
    with pytest.raises(ValueError, match=r"outside 0\.\.100"):
        hist.percentiles([101])
    with pytest.raises(ValueError, match=r"outside 0\.\.100"):
        HistogramSnapshot.empty().percentile(-1)


def test_swap_takes_the_interval_and_starts_empty() -> None:
    hist = LatencyHistogram()
    for v in (1.0, 2.0, 3.0):
        hist.record(v)
    taken = hist.swap()
    assert taken.count == 3 and taken.percentile(50) == pytest.approx(2.0, rel=RELATIVE_ERROR)
    assert hist.count == 0 and hist.percentiles([50]) == [None]
    hist.record(10.0)
    merged = taken.merge(hist.snapshot())
    assert merged.count == 4 and merged.max_ms == 10.0 and merged.min_ms == 1.0
    hist.reset()
    assert hist.snapshot().count == 0


def test_cumulative_counts_split_at_the_bounds() -> None:
    hist = LatencyHistogram()
    for v in (0.5, 0.9, 4.0, 40.0, 400.0):
        hist.record(v)
    assert hist.snapshot().cumulative_counts([1.0, 10.0, 100.0, 1000.0]) == [2, 3, 4, 5]


def test_record_cost() -> None:
    hist = LatencyHistogram()
    values = np.random.default_rng(0).lognormal(1.0, 1.0, 100_000).tolist()
    start = time.perf_counter()
    for v in values:
        hist.record(v)
    per_call_us = (time.perf_counter() - start) / len(values) * 1e6
    print(f"LatencyHistogram.record: {per_call_us:.2f} µs per call")
    assert hist.count == len(values)
    assert per_call_us < 10.0  # ~1 µs on a laptop; generous for a loaded CI machine


# --- stats -----------------------------------------------------------------------------


def test_model_stats_counts_and_interval() -> None:
    stats = ModelStats("face")
    assert stats.take_interval() is None
    for v in range(1, 101):
        stats.record_ok(float(v))
    stats.record_error("overloaded")
    stats.record_error("overloaded")
    stats.record_error("bad_input")
    stats.record_error("no_such_code")  # not a protocol code: counted as internal
    latency = stats.take_interval()
    assert latency is not None
    assert latency.p50 == pytest.approx(50.0, rel=RELATIVE_ERROR)
    assert latency.p95 == pytest.approx(95.0, rel=RELATIVE_ERROR)
    assert latency.p99 == pytest.approx(99.0, rel=RELATIVE_ERROR)
    assert stats.take_interval() is None  # a new interval with nothing in it
    assert stats.requests_total == 104
    assert stats.errors_total == {"overloaded": 2, "bad_input": 1, "internal": 1}
    snap = stats.snapshot()
    assert snap.latency.count == 100 and snap.latency.sum_ms == pytest.approx(5050.0)


def test_model_stats_are_exact_under_concurrency() -> None:
    stats = ModelStats("m")
    threads_n, per_thread = 6, 5_000
    stop = threading.Event()
    intervals: list[object] = []

    def work(seed: int) -> None:
        rng = np.random.default_rng(seed)
        for i, v in enumerate(rng.lognormal(0.0, 1.0, per_thread).tolist()):
            if i % 10 == 0:
                stats.record_error("overloaded")
            else:
                stats.record_ok(v)

    def ticker() -> None:  # the telemetry tick, swapping intervals all along
        while not stop.is_set():
            intervals.append(stats.take_interval())
            stats.snapshot()

    tick = threading.Thread(target=ticker)
    tick.start()
    workers = [threading.Thread(target=work, args=(s,)) for s in range(threads_n)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    tick.join()
    errors = threads_n * per_thread // 10
    assert stats.requests_total == threads_n * per_thread
    assert stats.errors_total == {"overloaded": errors}
    assert stats.snapshot().latency.count == threads_n * per_thread - errors
    assert len(intervals) > 1


def test_agent_stats_survive_a_hot_swap_by_name() -> None:
    registry = AgentStats()
    before = registry.model("face")
    before.record_ok(3.0)
    # The hot swap builds a new runtime; the stats are fetched again by name.
    after = registry.model("face")
    assert after is before and after.requests_total == 1
    assert registry.get("nope") is None
    assert set(registry.all()) == {"face"}
    registry.record_unrouted("unknown_model")
    registry.record_unrouted("weird")
    assert registry.unrouted_errors == {"unknown_model": 1, "internal": 1}


# --- system ----------------------------------------------------------------------------


@pytest.fixture
def machine(tmp_path: Path) -> FakeMachine:
    return FakeMachine(tmp_path / "root")


def test_system_reading_with_thermal_zones(machine: FakeMachine, tmp_path: Path) -> None:
    machine.thermal_zone(0, "cpu-thermal", 52300).thermal_zone(1, "gpu-thermal", 48150)
    machine.write("/sys/class/devfreq/17000000.gpu/device/load", "375\n")
    system = SystemCollector(load_profile("jetson-orin"), tmp_path / "state", root=machine.root)
    reading = system.read()
    assert reading.temperature_c == 52.3  # the hottest
    assert reading.temperatures_c == {"thermal.cpu-thermal": 52.3, "thermal.gpu-thermal": 48.15}
    assert reading.loads_percent == {"gpu": 37.5}
    memory = psutil.virtual_memory()
    assert reading.mem_total_bytes == memory.total
    assert 0 < reading.mem_used_bytes < reading.mem_total_bytes
    rss = psutil.Process().memory_info().rss
    assert abs(reading.agent_rss_bytes - rss) < 64 * 2**20
    # The state dir does not exist yet: its nearest existing parent is measured.
    free = shutil.disk_usage(tmp_path).free
    assert abs(reading.disk_free_bytes - free) < 64 * 2**20
    body = json.loads(reading.to_document().to_json())
    assert body["temperature_c"] == 52.3
    assert system.last is reading
    assert reading.extra_fields()["loads_percent"] == {"gpu": 37.5}


def test_system_reading_without_sensors_leaves_them_out(
    machine: FakeMachine, tmp_path: Path
) -> None:
    machine.write("/proc/cpuinfo", "processor\t: 0\n")  # a root with no thermal zones
    system = SystemCollector(load_profile("generic-x86_64"), tmp_path, root=machine.root)
    reading = system.read()
    assert reading.temperature_c is None
    body = json.loads(reading.to_document().to_json())
    assert "temperature_c" not in body
    assert reading.extra_fields() == {}


def test_raspberry_pi_throttling_flags(machine: FakeMachine, tmp_path: Path) -> None:
    machine.write("/sys/class/thermal/thermal_zone0/temp", "61850\n")
    machine.write("/sys/devices/platform/soc/soc:firmware/get_throttled", "50005\n")
    reading = SystemCollector(load_profile("raspberry-pi-5"), tmp_path, root=machine.root).read()
    assert reading.temperature_c == 61.85
    assert reading.flags["throttled.under_voltage"] is True
    assert reading.flags["throttled.freq_capped"] is False
    assert reading.flags["throttled.under_voltage_occurred"] is True


def test_cpu_percent_measures_since_the_last_read(tmp_path: Path) -> None:
    system = SystemCollector(load_profile("generic-x86_64"), tmp_path, root=tmp_path)
    system.read()
    deadline = time.perf_counter() + 0.4
    while time.perf_counter() < deadline:  # keep one core busy
        pass
    busy = system.read().cpu_percent
    cores = psutil.cpu_count() or 1
    assert 0.5 * 100 / cores <= busy <= 100.0
    assert 0.0 <= system.read().cpu_percent <= 100.0


# --- the document ----------------------------------------------------------------------

FIXED_TS = datetime(2026, 11, 23, 10, 0, 0, 123456, tzinfo=UTC)


def make_collector(tmp_path: Path, machine: FakeMachine, stats: AgentStats) -> TelemetryCollector:
    system = SystemCollector(load_profile("jetson-orin"), tmp_path, root=machine.root)
    return TelemetryCollector("dev-1", system, stats, clock=lambda: FIXED_TS)


def test_collected_document_validates_and_has_the_required_fields(
    machine: FakeMachine, tmp_path: Path
) -> None:
    machine.thermal_zone(0, "cpu-thermal", 40000)
    stats = AgentStats()
    face = stats.model("face")
    for v in (2.0, 4.0, 6.0, 8.0):
        face.record_ok(v)
    face.record_error("overloaded")
    stats.model("vad").record_error("bad_input")
    stats.model("retired").record_ok(1.0)  # served no more: not reported
    stats.record_unrouted("unknown_model")
    collector = make_collector(tmp_path, machine, stats)
    models = {
        "face": ModelGauge("CUDAExecutionProvider", 3),
        "vad": ModelGauge("CPUExecutionProvider", 0),
        "ocr": ModelGauge("CPUExecutionProvider", 1),  # no stats yet
    }
    payload = collector.collect(7, models, outbox_dropped=2)

    doc = decode_document(TelemetryDocument, payload)
    assert doc.seq == 7 and doc.ts == FIXED_TS.replace(microsecond=123000)
    assert set(doc.models) == {"face", "vad", "ocr"}
    face_doc = doc.models["face"]
    assert face_doc.requests == 5 and face_doc.errors == {"overloaded": 1}
    assert face_doc.queue_depth == 3 and face_doc.provider == "CUDAExecutionProvider"
    assert face_doc.latency_ms is not None
    assert face_doc.latency_ms.p50 == pytest.approx(4.0, rel=RELATIVE_ERROR)
    assert face_doc.latency_ms.p99 == pytest.approx(8.0, rel=RELATIVE_ERROR)
    assert doc.models["vad"].requests == 1 and doc.models["vad"].latency_ms is None
    assert doc.models["ocr"].requests == 0 and doc.models["ocr"].errors == {}
    assert doc.system.temperature_c == 40.0 and doc.system.mem_total_bytes > 0

    body = json.loads(payload)
    assert body["ts"] == "2026-11-23T10:00:00.123Z"
    assert body["models"]["vad"]["latency_ms"] is None  # null, not absent
    assert body["outbox_dropped"] == 2
    assert body["unrouted_errors"] == {"unknown_model": 1}
    assert body["system"]["temperatures_c"] == {"thermal.cpu-thermal": 40.0}
    for key in ("cpu_percent", "mem_used_bytes", "agent_rss_bytes", "disk_free_bytes"):
        assert key in body["system"]

    # The next document's interval is empty; the counters since start are kept.
    again = decode_document(TelemetryDocument, collector.collect(8, models))
    assert again.models["face"].latency_ms is None and again.models["face"].requests == 5


def test_enqueue_writes_the_document_with_the_outbox_seq(
    machine: FakeMachine, tmp_path: Path
) -> None:
    collector = make_collector(tmp_path, machine, AgentStats())
    with Outbox(tmp_path / "outbox.db") as outbox:
        seqs = [collector.enqueue(outbox, "edge/dev-1/telemetry", {}) for _ in range(3)]
        assert seqs == [1, 2, 3]
        entries = outbox.peek()
    assert [decode_document(TelemetryDocument, e.payload).seq for e in entries] == [1, 2, 3]
    assert {(e.topic, e.qos, e.retain) for e in entries} == {("edge/dev-1/telemetry", 0, False)}
    assert "temperature_c" not in json.loads(entries[0].payload)["system"]  # no sensor here


def test_invalid_model_name_is_refused(machine: FakeMachine, tmp_path: Path) -> None:
    collector = make_collector(tmp_path, machine, AgentStats())
    with pytest.raises(ValueError, match="models"):
        collector.collect(1, {"bad name": ModelGauge("cpu", 0)})


# --- Prometheus ------------------------------------------------------------------------


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_prometheus_endpoint_serves_the_stats(machine: FakeMachine, tmp_path: Path) -> None:
    from agent.telemetry.prometheus import start_prometheus

    stats = AgentStats()
    face = stats.model("face")
    for v in (0.7, 3.0, 30.0):  # ms
        face.record_ok(v)
    face.record_error("deadline_exceeded")
    stats.record_unrouted("unknown_model")
    system = SystemCollector(load_profile("jetson-orin"), tmp_path, root=machine.root)
    system.read()
    with Outbox(tmp_path / "o.db") as outbox:
        outbox.put("edge/d/telemetry", b"{}")
        endpoint = start_prometheus(stats, "127.0.0.1", 0, system=system, outbox=outbox)
        try:
            assert endpoint.url.startswith("http://127.0.0.1:")
            metrics = scrape(endpoint.url)
            face.record_ok(3.0)  # read at scrape time: the next scrape sees it
            metrics_after = scrape(endpoint.url)
        finally:
            endpoint.close()
    model = (("model", "face"),)
    assert metrics[("edge_agent_requests_total", model)] == 4
    errors_key = ("edge_agent_request_errors_total", (("code", "deadline_exceeded"), *model))
    assert metrics[errors_key] == 1
    bucket = "edge_agent_request_latency_seconds_bucket"
    assert metrics[(bucket, (("le", "0.001"), *model))] == 1
    assert metrics[(bucket, (("le", "0.005"), *model))] == 2
    assert metrics[(bucket, (("le", "0.05"), *model))] == 3
    assert metrics[(bucket, (("le", "+Inf"), *model))] == 3
    assert metrics[("edge_agent_request_latency_seconds_count", model)] == 3
    assert metrics[("edge_agent_request_latency_seconds_sum", model)] == pytest.approx(0.0337)
    assert metrics[("edge_agent_unrouted_errors_total", (("code", "unknown_model"),))] == 1
    assert metrics[("edge_agent_outbox_entries", ())] == 1
    assert metrics[("edge_agent_system_memory_total_bytes", ())] == psutil.virtual_memory().total
    assert metrics[("process_resident_memory_bytes", ())] > 0
    assert metrics_after[("edge_agent_requests_total", model)] == 5
    # Closed: the port is released and can be bound again.
    again = start_prometheus(stats, "127.0.0.1", endpoint.port)
    again.close()


def test_prometheus_port_in_use_is_a_config_error() -> None:
    from agent.telemetry.prometheus import start_prometheus

    first = start_prometheus(AgentStats(), "127.0.0.1", 0)
    try:
        with pytest.raises(
            ConfigError, match=re.escape(f"cannot listen on 127.0.0.1:{first.port}")
        ):
            start_prometheus(AgentStats(), "127.0.0.1", first.port)
    finally:
        first.close()
