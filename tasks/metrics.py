"""Prometheus metrics of one worker: jobs by outcome, tokens, job latency, the engine's load.

Served over HTTP when the config sets metrics_port (the launcher gives worker group g the
port metrics_port + g). Flower shows the Celery side (tasks, workers); these show the engine.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

log = logging.getLogger(__name__)

# Set by the launcher: this worker's group index (offsets the metrics port).
WORKER_INDEX_ENV = "TIDEQ_WORKER_INDEX"
# Job latencies from interactive (sub-second) to long offline generations.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)


def _reader(stats: Callable[[], dict[str, Any]], key: str) -> Callable[[], float]:
    return lambda: float(stats().get(key, 0))


class WorkerMetrics:
    """The metrics of one worker process, in a registry of its own."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry()
        self.jobs = Counter("tideq_jobs", "Jobs finished by this worker, by final state",
                            ["state", "priority"], registry=self.registry)
        self.tokens = Counter("tideq_generated_tokens", "Output tokens of finished jobs",
                              registry=self.registry)
        self.latency = Histogram("tideq_job_seconds", "Engine time of a job, submit to finish",
                                 ["priority"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        stats = engine.stats
        for name, key, doc in (
            ("tideq_engine_running", "running", "Sequences the engine is running"),
            ("tideq_engine_waiting", "waiting", "Requests waiting in the engine"),
            ("tideq_engine_kv_blocks_free", "kv_blocks_free", "Free KV-cache blocks"),
            ("tideq_engine_preemptions", "num_preemptions", "Preemptions so far"),
        ):
            Gauge(name, doc, registry=self.registry).set_function(_reader(stats, key))

    def job_finished(self, state: str, priority: str, tokens: int = 0,
                     seconds: float | None = None) -> None:
        self.jobs.labels(state=state, priority=priority).inc()
        if tokens:
            self.tokens.inc(tokens)
        if seconds is not None:
            self.latency.labels(priority=priority).observe(seconds)

    def serve(self, base_port: int) -> int:
        """Start the HTTP endpoint; returns the port."""
        port = base_port + int(os.environ.get(WORKER_INDEX_ENV, "0"))
        start_http_server(port, registry=self.registry)
        log.info("metrics on :%d/metrics", port)
        return port
