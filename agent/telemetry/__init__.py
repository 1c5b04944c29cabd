"""The agent's telemetry: stats, system gauges, the document, the outbox, Prometheus.

    histogram.py   a fast, thread-safe log-linear latency histogram
    stats.py       per-model counters and latencies (ModelStats), by name (AgentStats)
    system.py      CPU, memory, disk and the profile's sensors (SystemCollector)
    collector.py   one telemetry document from all of the above (TelemetryCollector)
    outbox.py      the bounded on-disk buffer and the persistent ``seq`` (Outbox)
    prometheus.py  an optional local /metrics endpoint (start_prometheus)

``prometheus.py`` is not imported here: it is loaded only when the endpoint is enabled.
"""

from __future__ import annotations

from agent.telemetry.collector import ModelGauge, TelemetryCollector
from agent.telemetry.histogram import HistogramSnapshot, LatencyHistogram
from agent.telemetry.outbox import Outbox, OutboxEntry, OutboxError, Publish
from agent.telemetry.stats import AgentStats, ModelStats, StatsSnapshot
from agent.telemetry.system import SystemCollector, SystemReading

__all__ = [
    "AgentStats",
    "HistogramSnapshot",
    "LatencyHistogram",
    "ModelGauge",
    "ModelStats",
    "Outbox",
    "OutboxEntry",
    "OutboxError",
    "Publish",
    "StatsSnapshot",
    "SystemCollector",
    "SystemReading",
    "TelemetryCollector",
]
