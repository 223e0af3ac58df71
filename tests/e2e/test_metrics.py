"""A real worker's /metrics: the values move with the jobs it runs and the queues it leaves;
its start-up says what it loaded; a prefork pool is refused."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from producer import Producer
from tasks.config import load_config
from tests.conftest import REPO, write_config

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> tuple[str, Samples]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, samples


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_move_with_the_jobs(tmp_path, redis_url, tiny_llama, start_worker):
    port = free_port()
    config_path = write_config(tmp_path / "d.yaml", redis_url, tiny_llama, metrics_port=port)
    # This worker takes `high` only: what is submitted as `low` stays in its queue.
    worker = start_worker(config_path, queues="high", concurrency=4)
    text, before = scrape(port)
    for name in ("tideq_jobs", "tideq_generated_tokens", "tideq_prompt_tokens",
                 "tideq_job_seconds", "tideq_time_to_first_token_seconds",
                 "tideq_engine_running", "tideq_engine_waiting", "tideq_engine_kv_blocks_used",
                 "tideq_engine_kv_blocks_total", "tideq_engine_preemptions",
                 "tideq_queue_depth", "tideq_device_memory_used_bytes",
                 "tideq_jobs_in_flight", "tideq_jobs_in_flight_limit",
                 "tideq_messages_waiting"):
        assert f"# HELP {name}" in text, name
    assert value(before, "tideq_queue_depth", queue="low") == 0
    # CPU: the device memory gauge has no samples.
    assert not any(name == "tideq_device_memory_used_bytes" for name, _ in before)

    rows = [{"prompt": f"count to {i}", "max_tokens": 4, "temperature": 0} for i in range(3)]
    with Producer(load_config(config_path)) as producer:
        high = producer.submit(write_jsonl(tmp_path / "h.jsonl", rows), priority="high")
        producer.submit(write_jsonl(tmp_path / "l.jsonl", rows + rows[:2]), priority="low")
        assert producer.wait(high.batch_id, timeout=60).succeeded
    _, after = scrape(port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("tideq_jobs_total", state="done", priority="high") == 3
    assert moved("tideq_jobs_total", state="done", priority="low") == 0
    assert moved("tideq_job_seconds_count", priority="high") == 3
    assert moved("tideq_generated_tokens_total") == 3 * 4
    assert moved("tideq_prompt_tokens_total") > 0
    assert moved("tideq_time_to_first_token_seconds_count", priority="high") == 3
    assert value(after, "tideq_queue_depth", queue="low") == 5
    assert value(after, "tideq_queue_depth", queue="high") == 0
    assert value(after, "tideq_engine_running") == 0
    # Every high job is stored: none in flight, no message waiting; the limit is the config's.
    assert value(after, "tideq_jobs_in_flight") == 0
    assert value(after, "tideq_messages_waiting") == 0
    assert value(after, "tideq_jobs_in_flight_limit") == load_config(
        config_path).jobs_in_flight_limit
    total = value(after, "tideq_engine_kv_blocks_total")
    assert total > 0
    assert value(after, "tideq_engine_kv_blocks_used") == total - value(
        after, "tideq_engine_kv_blocks_free")

    log = worker.log()
    # Logged at -l info (after Celery set logging up), and printed on stderr at any level.
    assert f"INFO/MainProcess] tideq worker w0@{socket.gethostname()} ready: model" in log, log
    assert log.count("ready: model " + str(tiny_llama)) == 2, log
    assert f"metrics :{port}/metrics" in log
    assert "task events are off until a monitor asks" in log
    # What the worker holds once started is out of the collector's sight (torch alone is
    # over 100,000 objects): full collections no longer stall its threads for ~0.1 s.
    frozen = re.search(r"start-up heap frozen \((\d+) objects\)", log)
    assert frozen is not None and int(frozen.group(1)) > 100_000, log


def test_the_prefork_pool_is_refused(tmp_path, redis_url, tiny_llama):
    config_path = write_config(tmp_path / "d.yaml", redis_url, tiny_llama)
    env = {**os.environ, "TIDEQ_CONFIG": str(config_path)}
    env.pop("TIDEQ_REDIS_URL", None)
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-P", "prefork", "-c", "2",
         "--without-gossip", "--without-mingle", "--without-heartbeat"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=60,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "tideq workers run with -P threads (or solo), not prefork" in out, out
