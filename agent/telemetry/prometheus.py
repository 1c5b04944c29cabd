"""An optional local Prometheus endpoint, fed from the same stats as telemetry.

Metrics are read from :class:`AgentStats` at scrape time by a custom collector, so
nothing is counted twice and the hot path stays as cheap as it is:

    edge_agent_requests_total{model}                  every request answered
    edge_agent_request_errors_total{model,code}       requests answered with an error
    edge_agent_unrouted_errors_total{code}            errors of requests that reached no model
    edge_agent_request_latency_seconds{model}         histogram of successful requests
    edge_agent_outbox_entries, edge_agent_outbox_dropped_total     (with an outbox)
    edge_agent_system_*                               the last telemetry reading (with a system)
    process_resident_memory_bytes, process_cpu_seconds_total, ...  (prometheus-client)

The latency buckets are derived from the log-linear histogram, so each ``le`` boundary
is exact to within the histogram's 1.6 %. ``prometheus_client`` is imported only when
the endpoint is started. It listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.telemetry.outbox import Outbox
    from agent.telemetry.stats import AgentStats
    from agent.telemetry.system import SystemCollector

#: Upper bounds of the latency buckets, in seconds.
LATENCY_BUCKETS_S = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
    0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class _StatsCollector:
    """A prometheus-client collector that reads the stats when scraped."""

    def __init__(
        self, stats: AgentStats, system: SystemCollector | None, outbox: Outbox | None
    ) -> None:
        self._stats = stats
        self._system = system
        self._outbox = outbox

    def describe(self) -> list[Any]:
        return []  # names are not known ahead (models come and go)

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        requests = CounterMetricFamily(
            "edge_agent_requests", "Requests answered, with outputs or an error.", labels=["model"]
        )
        errors = CounterMetricFamily(
            "edge_agent_request_errors",
            "Requests answered with an error, by protocol error code.",
            labels=["model", "code"],
        )
        latency = HistogramMetricFamily(
            "edge_agent_request_latency_seconds",
            "Time from receiving a request to answering it with outputs.",
            labels=["model"],
        )
        bounds_ms = [b * 1000.0 for b in LATENCY_BUCKETS_S]
        for name, model_stats in sorted(self._stats.all().items()):
            snap = model_stats.snapshot()
            requests.add_metric([name], snap.requests_total)
            for code, n in sorted(snap.errors_total.items()):
                errors.add_metric([name, code], n)
            counts = snap.latency.cumulative_counts(bounds_ms)
            buckets = [(repr(b), n) for b, n in zip(LATENCY_BUCKETS_S, counts, strict=True)]
            buckets.append(("+Inf", snap.latency.count))
            latency.add_metric([name], buckets, snap.latency.sum_ms / 1000.0)
        yield from (requests, errors, latency)

        unrouted = CounterMetricFamily(
            "edge_agent_unrouted_errors",
            "Errors of requests that reached no model, by protocol error code.",
            labels=["code"],
        )
        for code, n in sorted(self._stats.unrouted_errors.items()):
            unrouted.add_metric([code], n)
        yield unrouted

        if self._outbox is not None:
            yield GaugeMetricFamily(
                "edge_agent_outbox_entries",
                "Messages waiting in the outbox.",
                value=len(self._outbox),
            )
            yield CounterMetricFamily(
                "edge_agent_outbox_dropped",
                "Outbox entries dropped (oldest first, when full).",
                value=self._outbox.dropped_total,
            )
        reading = self._system.last if self._system is not None else None
        if reading is not None:
            gauges: dict[str, tuple[str, float | None]] = {
                "cpu_percent": (
                    "Whole-machine CPU use at the last telemetry.",
                    reading.cpu_percent,
                ),
                "memory_used_bytes": ("Memory in use (total - available).", reading.mem_used_bytes),
                "memory_total_bytes": ("Total memory.", reading.mem_total_bytes),
                "disk_free_bytes": ("Free space of the state dir.", reading.disk_free_bytes),
                "temperature_celsius": ("The hottest sensor.", reading.temperature_c),
            }
            for key, (doc, value) in gauges.items():
                if value is not None:
                    yield GaugeMetricFamily(f"edge_agent_system_{key}", doc, value=value)


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes are not worth a log line each."""


class PrometheusEndpoint:
    """A running endpoint; :meth:`close` stops it."""

    def __init__(self, server: WSGIServer, thread: threading.Thread) -> None:
        self._server = server
        self._thread = thread
        address = server.server_address
        self.host = str(address[0])
        self.port = int(address[1])

    @property
    def url(self) -> str:
        """The metrics URL, e.g. ``http://127.0.0.1:9464/metrics``."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join(timeout=5)
        self._server.server_close()


def start_prometheus(
    stats: AgentStats,
    host: str = "127.0.0.1",
    port: int = 9464,
    *,
    system: SystemCollector | None = None,
    outbox: Outbox | None = None,
) -> PrometheusEndpoint:
    """Serve ``stats`` (and the process's RSS and CPU) at ``http://host:port/metrics``.

    ``port=0`` picks a free port (see :attr:`PrometheusEndpoint.port`).

    Raises:
        ConfigError: prometheus-client is not installed, or ``host:port`` cannot be bound.
    """
    try:
        from prometheus_client import CollectorRegistry, ProcessCollector, make_wsgi_app
    except ImportError:
        raise ConfigError(
            "the Prometheus endpoint needs prometheus-client (pip install 'edge-fleet[agent]')"
        ) from None
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    registry.register(_StatsCollector(stats, system, outbox))
    server_class = type(
        "_Server",
        (_ThreadingServer,),
        {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET},
    )
    try:
        server: WSGIServer = make_server(
            host, port, make_wsgi_app(registry), server_class, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise ConfigError(f"prometheus: cannot listen on {host}:{port}: {exc.strerror}") from None
    thread = threading.Thread(
        target=server.serve_forever, name="prometheus", kwargs={"poll_interval": 0.5}, daemon=True
    )
    thread.start()
    return PrometheusEndpoint(server, thread)
