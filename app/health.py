"""HTTP ``/healthz`` and ``/metrics`` (Prometheus text format) for ``oncopacs serve``.

Metrics carry no patient identifiers: counts, states and durations only.
Each service gets its own registry, so tests (and two services in one
process) do not share counters.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

log = logging.getLogger(__name__)

STAGE_BUCKETS_S = (0.1, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


class Metrics:
    """The service's counters, gauges and stage-duration histograms."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.instances_received = Counter(
            "oncopacs_instances_received", "DICOM instances stored in the spool",
            registry=self.registry)
        self.instances_rejected = Counter(
            "oncopacs_instances_rejected", "DICOM instances refused, by reason",
            ["reason"], registry=self.registry)
        self.studies_received = Counter(
            "oncopacs_studies_received", "studies that became complete jobs",
            registry=self.registry)
        self.hl7_messages = Counter(
            "oncopacs_hl7_messages", "HL7 messages answered, by ACK code", ["ack"],
            registry=self.registry)
        self.jobs = Gauge("oncopacs_jobs", "jobs by state", ["state"], registry=self.registry)
        self.export_retries = Counter(
            "oncopacs_export_retries", "failed export attempts that will be retried",
            registry=self.registry)
        self.export_dead = Counter(
            "oncopacs_export_dead_letters", "exports given up after the retry limit",
            registry=self.registry)
        self.stage_seconds = Histogram(
            "oncopacs_stage_seconds", "duration of each pipeline stage", ["stage"],
            buckets=STAGE_BUCKETS_S, registry=self.registry)

    def set_job_counts(self, counts: Mapping[str, int]) -> None:
        """Replace the per-state job gauge with ``counts``."""
        for state, count in counts.items():
            self.jobs.labels(state=state).set(count)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return bytes(generate_latest(self.registry))


HealthCheck = Callable[[], Mapping[str, Any]]


def _handler(metrics: Metrics, health: HealthCheck) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/metrics":
                self._send(200, CONTENT_TYPE_PLAIN_0_0_4, metrics.render())
            elif self.path == "/healthz":
                status = dict(health())
                code = 200 if status.get("ok") else 503
                self._send(code, "application/json", json.dumps(status).encode())
            else:
                self._send(404, "text/plain", b"not found: try /healthz or /metrics\n")

        def _send(self, code: int, content_type: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug("http %s", format % args)

    return Handler


class HealthServer:
    """A small HTTP server on its own thread serving ``/healthz`` and ``/metrics``."""

    def __init__(self, host: str, port: int, metrics: Metrics, health: HealthCheck) -> None:
        self._server = ThreadingHTTPServer((host, port), _handler(metrics, health))
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        name="oncopacs-http", daemon=True)

    @property
    def port(self) -> int:
        """The bound port (useful when 0 was asked for)."""
        return int(self._server.server_address[1])

    def start(self) -> HealthServer:
        """Serve in the background."""
        self._thread.start()
        log.info("health and metrics on port %d", self.port)
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
