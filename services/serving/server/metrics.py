"""Prometheus metrics, correct across gunicorn workers (prometheus_client multiprocess mode).

``PROMETHEUS_MULTIPROC_DIR`` must be set before this module is imported in a worker; the
CLI sets it and ``gunicorn_conf`` empties it at start and marks dead workers. Names and
labels are the shared contract that dashboards, alerts, the SLO gate and capacity use.
"""

from __future__ import annotations

import os
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

ROUTES = (
    "infer",
    "v1_predict",
    "model_metadata",
    "model_ready",
    "server_metadata",
    "live",
    "ready",
    "metrics",
    "openapi",
    "other",
)
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE = CONTENT_TYPE_LATEST
_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256)

REQUESTS = Counter("dlstack_requests", "HTTP requests by route and status code", ["model", "version", "route", "code"])
REQUEST_DURATION = Histogram(
    "dlstack_request_duration_seconds", "Time to answer a request", ["model", "version", "route"], buckets=_LATENCY
)
INFERENCE_DURATION = Histogram(
    "dlstack_inference_duration_seconds", "One forward pass", ["model", "version"], buckets=_LATENCY
)
BATCH_SIZE = Histogram("dlstack_batch_size", "Rows per forward pass", ["model", "version"], buckets=_ROWS)
INFLIGHT = Gauge(
    "dlstack_inflight_requests", "Requests being answered", ["model", "version"], multiprocess_mode="livesum"
)
MODEL_LOAD = Gauge(
    "dlstack_model_load_seconds", "Time to load the model", ["model", "version"], multiprocess_mode="max"
)
MODEL_INFO = Gauge(
    "dlstack_model_info", "The served model", ["model", "version", "framework", "sha256"], multiprocess_mode="max"
)


class ModelMetrics:
    """Label children bound once per worker, so the hot path does no label lookups."""

    def __init__(self, model: str, version: str) -> None:
        self.model, self.version = model, version
        self.inflight = INFLIGHT.labels(model, version)
        self.inference = INFERENCE_DURATION.labels(model, version)
        self.batch_size = BATCH_SIZE.labels(model, version)
        self._requests: dict[tuple[str, int], Any] = {}
        self._durations = {r: REQUEST_DURATION.labels(model, version, r) for r in ROUTES}

    def request(self, route: str, code: int, seconds: float) -> None:
        child = self._requests.get((route, code))
        if child is None:
            child = self._requests[(route, code)] = REQUESTS.labels(self.model, self.version, route, str(code))
        child.inc()
        self._durations[route].observe(seconds)

    def loaded(self, framework: str, sha256: str, seconds: float) -> None:
        MODEL_LOAD.labels(self.model, self.version).set(seconds)
        MODEL_INFO.labels(self.model, self.version, framework, sha256).set(1)


def exposition() -> bytes:
    """All workers' metrics when multiprocess mode is on, else this process's."""
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    from prometheus_client import REGISTRY

    return generate_latest(REGISTRY)


def mark_process_dead(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)
