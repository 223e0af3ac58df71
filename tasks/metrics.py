"""Prometheus metrics of one worker: jobs by outcome, tokens, latencies, queue depths, the
engine's load and the devices' memory.

Served over HTTP when the config sets metrics_port (the launcher gives worker group g the
port metrics_port + g). Flower shows the Celery side (tasks, workers); these show the engine.

Tokens are counters: `rate(tideq_generated_tokens_total[1m])` is the worker's output tokens/s.
The gauges read at scrape time (engine.stats(), LLEN of the queues, the devices' memory); a
read that fails or hangs leaves its samples out of that scrape instead of failing it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeoutError
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from tasks import keys

log = logging.getLogger(__name__)

# Set by the launcher: this worker's group index (offsets the metrics port).
WORKER_INDEX_ENV = "TIDEQ_WORKER_INDEX"
# Job latencies from interactive (sub-second) to long offline generations.
_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# Time to first token: queueing in the engine plus the prefill.
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
# How long a scrape waits for the queue lengths. The store's client retries through a Redis
# outage for up to a minute; a scrape must not wait that long.
_QUEUE_READ_TIMEOUT_S = 1.0


class EngineCollector(Collector):
    """The engine's load, from one engine.stats() call per scrape."""

    def __init__(self, stats: Callable[[], dict[str, Any]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        try:
            stats = self._stats()
        except Exception:  # noqa: BLE001 - an engine going away must not fail the scrape
            log.debug("engine stats unavailable for metrics", exc_info=True)
            return
        for name, key, doc in (
            ("tideq_engine_running", "running", "Sequences the engine is running"),
            ("tideq_engine_waiting", "waiting", "Requests waiting in the engine"),
            ("tideq_engine_kv_blocks_total", "kv_blocks_total", "KV-cache blocks in all"),
            ("tideq_engine_kv_blocks_free", "kv_blocks_free", "Free KV-cache blocks"),
        ):
            if key in stats:
                yield GaugeMetricFamily(name, doc, value=float(stats[key]))
        if "kv_blocks_total" in stats and "kv_blocks_free" in stats:
            used = float(stats["kv_blocks_total"]) - float(stats["kv_blocks_free"])
            yield GaugeMetricFamily("tideq_engine_kv_blocks_used",
                                    "KV-cache blocks in use (total - free)", value=used)
        if "num_preemptions" in stats:
            yield CounterMetricFamily("tideq_engine_preemptions",
                                      "Sequences preempted (their KV blocks given back) so far",
                                      value=float(stats["num_preemptions"]))


class AdmissionCollector(Collector):
    """The worker's admission gate (tasks/admission.py): jobs in flight against its limit,
    `low` messages waiting for room, and whether the worker has stopped taking each queue's
    messages because it is full (tasks/intake.py): tideq_low_consumption_paused,
    tideq_high_consumption_paused. A full worker's engine is fed, and the queues' backlog is
    for other workers."""

    def __init__(self, gate: Any, intakes: Sequence[Any] = ()) -> None:
        self._gate = gate
        self._intakes = tuple(intakes)

    def collect(self) -> Iterator[Metric]:
        gate = self._gate
        yield GaugeMetricFamily("tideq_jobs_in_flight",
                                "Jobs this worker has started and not yet stored",
                                value=float(gate.in_flight))
        yield GaugeMetricFamily("tideq_jobs_in_flight_limit",
                                "max_jobs_in_flight: where low messages start to wait",
                                value=float(gate.limit))
        yield GaugeMetricFamily("tideq_messages_waiting",
                                "Low messages held by a task thread, waiting for room",
                                value=float(gate.waiting))
        for intake in self._intakes:
            yield GaugeMetricFamily(f"tideq_{intake.queue}_consumption_paused",
                                    f"1 while this worker takes no {intake.queue} messages:"
                                    " it is full", value=float(intake.paused))


class QueueDepthCollector(Collector):
    """LLEN of each queue, read through the worker's Redis client.

    The read runs on a thread of its own and the scrape waits at most timeout_s for it: while
    Redis is down (the client retrying) or slow, the gauge has no samples, and no second read
    is started while one is still pending."""

    def __init__(self, client: Any, queues: Sequence[str] = keys.QUEUES,
                 timeout_s: float = _QUEUE_READ_TIMEOUT_S) -> None:
        self._client = client
        self._queues = tuple(queues)
        self._timeout_s = timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tideq-metrics")
        self._lock = threading.Lock()
        self._pending: Future[list[Any]] | None = None

    def _read(self) -> list[Any]:
        pipe = self._client.pipeline(transaction=False)
        for queue in self._queues:
            pipe.llen(queue)
        return list(pipe.execute())

    def collect(self) -> Iterator[Metric]:
        gauge = GaugeMetricFamily("tideq_queue_depth", "Jobs waiting in each Redis queue",
                                  labels=["queue"])
        with self._lock:
            if self._pending is None or self._pending.done():
                self._pending = self._executor.submit(self._read)
            pending = self._pending
        try:
            lengths = pending.result(timeout=self._timeout_s)
        except FutureTimeoutError:
            log.debug("queue depths: Redis did not answer within %.1fs", self._timeout_s)
        except Exception as err:  # noqa: BLE001 - a Redis error must not fail the scrape
            log.debug("queue depths unavailable: %s", err)
        else:
            for queue, length in zip(self._queues, lengths, strict=True):
                gauge.add_metric([queue], float(length))
        yield gauge


class DeviceMemoryCollector(Collector):
    """Memory in use on each device this worker sees, by all processes (the engine's core
    runs in processes of its own, so this process's own allocations say little).

    torch.cuda.mem_get_info asks the driver; it makes this process hold a CUDA context on
    each device it reads. No samples on CPU."""

    def __init__(self, enabled: bool) -> None:
        self._enabled = enabled

    def collect(self) -> Iterator[Metric]:
        used = GaugeMetricFamily("tideq_device_memory_used_bytes",
                                 "Device memory in use by all processes, per visible device",
                                 labels=["device"])
        total = GaugeMetricFamily("tideq_device_memory_total_bytes",
                                  "Device memory in all, per visible device", labels=["device"])
        for index, free_b, total_b in self._read():
            used.add_metric([str(index)], float(total_b - free_b))
            total.add_metric([str(index)], float(total_b))
        yield used
        yield total

    def _read(self) -> Iterable[tuple[int, int, int]]:
        if not self._enabled:
            return []
        try:
            import torch

            if not torch.cuda.is_available():
                return []
            out = []
            for index in range(torch.cuda.device_count()):
                free_b, total_b = torch.cuda.mem_get_info(index)
                out.append((index, int(free_b), int(total_b)))
            return out
        except Exception:  # noqa: BLE001 - a device query must not fail the scrape
            log.debug("device memory unavailable for metrics", exc_info=True)
            return []


class WorkerMetrics:
    """The metrics of one worker process, in a registry of its own.

    Args:
        engine: anything with stats() -> dict (engine.engine.Engine).
        redis_client: the worker's Redis client, for the queue depths (none: no such gauge).
        gpu: whether this worker runs on GPUs (the device memory gauges).
        gate: the worker's admission gate (its gauges; none: no such gauges).
        intakes: the worker's QueueIntakes (whether it takes each queue's messages; a gauge
            per queue).
    """

    def __init__(self, engine: Any, redis_client: Any = None, gpu: bool = False,
                 gate: Any = None, intakes: Sequence[Any] = ()) -> None:
        self.registry = CollectorRegistry()
        # The port serve() listens on (None: not served).
        self.port: int | None = None
        self.jobs = Counter("tideq_jobs", "Jobs finished by this worker, by final state",
                            ["state", "priority"], registry=self.registry)
        self.tokens = Counter("tideq_generated_tokens", "Output tokens of finished jobs",
                              registry=self.registry)
        self.prompt_tokens = Counter("tideq_prompt_tokens", "Prompt tokens of finished jobs",
                                     registry=self.registry)
        self.latency = Histogram("tideq_job_seconds", "Engine time of a job, submit to finish",
                                 ["priority"], buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.first_token = Histogram("tideq_time_to_first_token_seconds",
                                     "Engine time of a job from submit to its first token",
                                     ["priority"], buckets=_TTFT_BUCKETS, registry=self.registry)
        self.registry.register(EngineCollector(engine.stats))
        if redis_client is not None:
            self.registry.register(QueueDepthCollector(redis_client))
        self.registry.register(DeviceMemoryCollector(gpu))
        if gate is not None:
            self.registry.register(AdmissionCollector(gate, intakes))

    def job_finished(self, state: str, priority: str, tokens: int = 0,
                     seconds: float | None = None, *, prompt_tokens: int = 0,
                     first_token_s: float | None = None) -> None:
        self.jobs.labels(state=state, priority=priority).inc()
        if tokens:
            self.tokens.inc(tokens)
        if prompt_tokens:
            self.prompt_tokens.inc(prompt_tokens)
        if seconds is not None:
            self.latency.labels(priority=priority).observe(seconds)
        if first_token_s is not None:
            self.first_token.labels(priority=priority).observe(first_token_s)

    def serve(self, base_port: int) -> int:
        """Start the HTTP endpoint; returns the port."""
        port = base_port + int(os.environ.get(WORKER_INDEX_ENV, "0"))
        start_http_server(port, registry=self.registry)
        self.port = port
        log.info("metrics on :%d/metrics", port)
        return port
