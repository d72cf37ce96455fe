"""``/healthz`` and ``/metrics`` over real HTTP."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from app.health import HealthServer, Metrics


@pytest.fixture
def served() -> Iterator[tuple[HealthServer, Metrics, dict[str, Any]]]:
    metrics = Metrics()
    state: dict[str, Any] = {"ok": True, "jobs": 0}
    server = HealthServer("127.0.0.1", 0, metrics, lambda: state).start()
    yield server, metrics, state
    server.stop()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics_are_prometheus_text(served: tuple[HealthServer, Metrics, dict[str, Any]],
                                     ) -> None:
    server, metrics, _ = served
    metrics.instances_received.inc(3)
    metrics.set_job_counts({"done": 2, "failed": 1})
    metrics.export_retries.inc()
    metrics.stage_seconds.labels(stage="segmentation").observe(1.7)
    reply = requests.get(f"http://127.0.0.1:{server.port}/metrics", timeout=5)
    assert reply.status_code == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    samples = _samples(reply.text)
    assert samples[("oncopacs_instances_received_total", ())] == 3
    assert samples[("oncopacs_jobs", (("state", "done"),))] == 2
    assert samples[("oncopacs_jobs", (("state", "failed"),))] == 1
    assert samples[("oncopacs_export_retries_total", ())] == 1
    assert samples[("oncopacs_stage_seconds_count", (("stage", "segmentation"),))] == 1


def test_healthz_reports_state_and_fails_when_unhealthy(
        served: tuple[HealthServer, Metrics, dict[str, Any]]) -> None:
    server, _, state = served
    url = f"http://127.0.0.1:{server.port}/healthz"
    assert requests.get(url, timeout=5).json() == {"ok": True, "jobs": 0}
    state["ok"] = False
    state["reason"] = "job store not writable"
    reply = requests.get(url, timeout=5)
    assert reply.status_code == 503
    assert reply.json()["reason"] == "job store not writable"
    assert requests.get(f"http://127.0.0.1:{server.port}/other", timeout=5).status_code == 404
