"""Health and Prometheus metrics over HTTP: `/healthz`, `/readyz`, `/metrics` (loopback by default).

- `/healthz`: 200 while the agent runs and its inference loop goes round (idle waits count); 503 with
  the reason otherwise (failed, stopped, or the loop stalled for `stall_after_s`).
- `/readyz`: 200 when the agent serves frames: running, a bundle loaded, the source open (the hot folder
  exists), not paused, and no sink failed on the latest result; 503 with every reason otherwise.
- `/metrics`: the Prometheus text format from one registry (`AgentMetrics.registry`): frames, results,
  defects, errors by code, drops by reason, sink failures, per-stage latency histograms, queue depth,
  last progress, bundle and providers as info metrics, process RSS/CPU (prometheus-client's process
  collector), GPU memory per device where the NVIDIA driver's NVML is there. MQTT's `metrics` topic
  may read the same registry.

Counters and gauges are read from `Agent.status()` at scrape time (nothing can drift from the pipeline's
own counters); histograms and defects come from a non-durable sink the service adds after every other
sink, which also sees whether those sinks stored each result.
"""

from __future__ import annotations

import errno
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from pydantic import Field

from lineside.agent.nvml import Nvml
from lineside.agent.plugins import StrictConfig
from lineside.agent.sinks.base import Sink

if TYPE_CHECKING:
    from lineside.agent.events import Event
    from lineside.agent.results import Frame, InspectionResult
    from lineside.agent.runtime import Agent

logger = logging.getLogger(__name__)

# Seconds; from a fast tile model on a GPU up to a large image on a CPU.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class HealthConfig(StrictConfig):
    """The health and metrics endpoint."""

    enabled: bool = Field(default=True, description="Serve /healthz, /readyz and /metrics over HTTP.")
    host: str = Field(
        default="127.0.0.1", description="Address to listen on; loopback unless the plant opens it (0.0.0.0)."
    )
    port: int = Field(default=9464, ge=0, le=65535, description="TCP port; 0 picks a free one (tests).")
    stall_after_s: float = Field(
        default=60.0, gt=0, description="/healthz fails when the inference loop has not gone round for this long."
    )


class MetricsSink(Sink):
    """Feeds the latency histograms and the defect counter, and notes which sinks failed on each result.

    Added after every other sink, so when it sees a result every other sink has had it.
    """

    name = "metrics"
    durable = False

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def publish(self, result: InspectionResult, frame: Frame) -> None:
        self.metrics.observe(result)

    def close(self) -> None:
        return None


class AgentMetrics:
    """The agent's Prometheus registry: status-derived figures at scrape time plus per-result histograms."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self._lock = threading.Lock()
        self._failing: dict[str, str] = {}  # sink name -> result id it last failed on
        self.registry = CollectorRegistry()
        self.latency = Histogram(
            "lineside_stage_latency_seconds",
            "Per-stage latency of each result (decode, queue, preprocess, each model, inference, publish, total).",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.defects = Counter(
            "lineside_defects", "Results with a defective verdict.", registry=self.registry
        )  # exposed as lineside_defects_total
        self.registry.register(_StatusCollector(agent, self))
        ProcessCollector(registry=self.registry)  # process_resident_memory_bytes, CPU, open fds (Linux)
        self.gpu = GpuMemoryCollector()
        self.registry.register(self.gpu)

    def observe(self, result: InspectionResult) -> None:
        """Record one result (dispatch thread)."""
        for stage, ms in result.latency_ms.items():
            self.latency.labels(stage=stage).observe(ms / 1000.0)
        if result.is_defective:
            self.defects.inc()
        with self._lock:
            # A sink that failed on an earlier result and not on this one has recovered.
            self._failing = {name: rid for name, rid in self._failing.items() if rid == result.result_id}

    def on_event(self, event: Event) -> None:
        """Notes sink failures (events hub subscriber; quick, never blocks)."""
        if event.kind == "sink_failed":
            with self._lock:
                self._failing[str(event.data.get("sink"))] = str(event.data.get("result_id"))

    def failing_sinks(self) -> list[str]:
        """Sinks that failed on the latest result they were given."""
        with self._lock:
            return sorted(self._failing)

    def text(self) -> bytes:
        """The Prometheus text exposition of the registry."""
        return generate_latest(self.registry)


class _StatusCollector:
    """Figures read from one `Agent.status()` snapshot per scrape."""

    def __init__(self, agent: Agent, metrics: AgentMetrics) -> None:
        self.agent = agent
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        status = self.agent.status()
        counters = status.counters
        yield _counter(
            "lineside_frames", "Frames captured (read and decoded, or an error frame).", counters, "frames_in"
        )
        yield _counter("lineside_results", "Results handed to the sinks.", counters, "results_out")
        yield _labelled_counter("lineside_errors", "Error results by code.", "code", counters.get("errors_by_code", {}))
        yield _labelled_counter(
            "lineside_drops",
            "Frames dropped without a result, by reason.",
            "reason",
            counters.get("drops_by_reason", {}),
        )
        yield _labelled_counter(
            "lineside_sink_failures",
            "Results a sink failed to take, by sink.",
            "sink",
            counters.get("sink_failures", {}),
        )
        queue = GaugeMetricFamily("lineside_queue_depth", "Items waiting in a queue.", labels=["queue"])
        queue.add_metric(["frames"], float(counters.get("queue_depth", 0)))
        for name, depth in sorted(status.queue_depths.items()):
            queue.add_metric([name], float(depth))
        yield queue
        service_events = CounterMetricFamily(
            "lineside_service_events",
            "Totals services count (uploads, evictions, updates...).",
            labels=["service", "counter"],
        )
        for service, values in sorted(status.service_counters.items()):
            for counter, value in sorted(values.items()):
                service_events.add_metric([service, counter], float(value))
        yield service_events
        yield GaugeMetricFamily(
            "lineside_last_progress_age_seconds",
            "Seconds since the inference loop last went round (it beats while idle too).",
            value=status.last_progress_age_s,
        )
        state = GaugeMetricFamily("lineside_state", "1 for the agent's current state.", labels=["state"])
        state.add_metric([str(status.state)], 1.0)
        yield state
        yield GaugeMetricFamily("lineside_paused", "1 while inspection is paused.", value=float(status.paused))
        yield GaugeMetricFamily(
            "lineside_failing_sinks", "Sinks that failed on the latest result.", value=len(self.metrics.failing_sinks())
        )
        bundle = InfoMetricFamily("lineside_bundle", "The model bundle being served.")
        bundle.add_metric(
            [], {"bundle_id": status.bundle_id or "", "version": status.bundle_version or "", "station": status.station}
        )
        yield bundle
        providers = GaugeMetricFamily(
            "lineside_provider", "1 for each ONNX Runtime provider in use, by preference order.", labels=["provider"]
        )
        for provider in status.providers:
            providers.add_metric([provider], 1.0)
        yield providers


def _counter(name: str, documentation: str, counters: dict[str, Any], key: str) -> CounterMetricFamily:
    return CounterMetricFamily(name, documentation, value=float(counters.get(key, 0)))


def _labelled_counter(name: str, documentation: str, label: str, values: dict[str, int]) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], float(value))
    return family


class GpuMemoryCollector(Nvml):
    """GPU memory per device as Prometheus gauges; yields nothing where there is no NVIDIA driver."""

    def collect(self) -> Iterator[Metric]:
        memory = self.memory()
        if not memory:
            return
        used = GaugeMetricFamily("lineside_gpu_memory_used_bytes", "GPU memory in use (all processes).", labels=["gpu"])
        total = GaugeMetricFamily("lineside_gpu_memory_total_bytes", "GPU memory in all.", labels=["gpu"])
        for index, (in_use, size) in sorted(memory.items()):
            used.add_metric([str(index)], float(in_use))
            total.add_metric([str(index)], float(size))
        yield used
        yield total


class HealthService:
    """Serves `/healthz`, `/readyz` and `/metrics` on its own thread; see the module docstring."""

    section: ClassVar[str] = "health"
    config_class: ClassVar[type[StrictConfig]] = HealthConfig
    name = "health"

    def __init__(self, agent: Agent, config: HealthConfig) -> None:
        self.agent = agent
        self.config = config
        self.metrics = AgentMetrics(agent)
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._unsubscribe = agent.events.subscribe(self.metrics.on_event)

    @classmethod
    def from_agent(cls, agent: Agent) -> HealthService | None:
        config: HealthConfig = agent.config.health
        return cls(agent, config) if config.enabled else None

    def sinks(self) -> list[Sink]:
        """The metrics sink (after every other sink: see MetricsSink)."""
        return [MetricsSink(self.metrics)]

    @property
    def port(self) -> int:
        """The port actually listened on (the configured one, or the free one picked for port 0)."""
        return self._server.server_address[1] if self._server is not None else self.config.port

    def start(self, stop: threading.Event) -> None:
        """Listen; OSError naming the address when it is taken (the agent's start fails, exit 1)."""
        handler = type("Handler", (_Handler,), {"service": self})
        try:
            self._server = ThreadingHTTPServer((self.config.host, self.config.port), handler)
        except OSError as err:
            hint = (
                " (another lineside-agent or exporter holds it: stop it, or set health.port)"
                if err.errno == errno.EADDRINUSE
                else ""
            )
            raise OSError(
                err.errno,
                f"health endpoint cannot listen on {self.config.host}:{self.config.port}: {err.strerror}{hint}",
            ) from err
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.2}, name="lineside-health", daemon=True
        )
        self._thread.start()
        logger.info("health on http://%s:%d/ (healthz, readyz, metrics)", self.config.host, self.port)

    def close(self) -> None:
        self._unsubscribe()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=1.0)
            self._thread = None

    # -- what the endpoints answer ---------------------------------------------------------------

    def liveness(self) -> tuple[bool, list[str]]:
        """Alive, and why not."""
        status = self.agent.status()
        problems = []
        if status.state in ("failed", "stopped"):
            problems.append(f"agent {status.state}" + (f": {status.failure}" if status.failure else ""))
        elif status.state == "running" and status.last_progress_age_s > self.config.stall_after_s:
            problems.append(f"inference loop stalled for {status.last_progress_age_s:.0f} s")
        return not problems, problems

    def readiness(self) -> tuple[bool, list[str]]:
        """Ready to inspect, and every reason why not."""
        status = self.agent.status()
        problems = []
        if status.state != "running":
            problems.append(f"agent {status.state}")
        if status.bundle_version is None:
            problems.append("no bundle loaded")
        if status.source_problem:
            problems.append(status.source_problem)
        if status.paused:
            problems.append("paused")
        problems.extend(f"sink {name} failing" for name in self.metrics.failing_sinks())
        return not problems, problems


class _Handler(BaseHTTPRequestHandler):
    service: ClassVar[HealthService]

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._send(200, self.service.metrics.text(), CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, problems = self.service.liveness() if path == "/healthz" else self.service.readiness()
            status = self.service.agent.status()
            body = {
                "ok": ok,
                "problems": problems,
                "state": str(status.state),
                "station": status.station,
                "bundle_version": status.bundle_version,
            }
            self._send(200 if ok else 503, json.dumps(body).encode() + b"\n", "application/json")
        else:
            self._send(404, b"not found: try /healthz, /readyz or /metrics\n", "text/plain; charset=utf-8")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("health: %s %s", self.address_string(), format % args)
