"""W-queue (BENCHMARKS.md): jobs through the whole path with an engine that answers at once,
against plain Celery doing the same round trip with no-op tasks, in the same run (CPU only).

- tideq: `Producer.submit` of a JSONL file of short prompts, one `celery -A tasks worker -Q
  high,low` process whose engine is `model.backend: echo` (no model), then `Producer.wait`
  and `Producer.results`: every job validated, enqueued, run, its record written and read
  back.
- plain Celery (`bench/plain_celery_app.py`): one `apply_async` per job of a no-op task, one
  worker process, Redis as broker and result backend, then `.get()` on every result.

Both workers use the threads pool with the same concurrency, against the same Redis. Each
side gets one warm-up batch, then --reps timed batches: first submit to last result in hand.
The median is reported. The Redis database must be a throwaway one: it is flushed before and
after.

    python bench/bench_queue.py [--jobs 5000] [--concurrency 8] [--jobs-per-message 16]
                                [--reps 3] [--out FILE]

tideq's worker runs `jobs_per_message` jobs per message (the engine's batch is concurrency x
jobs_per_message, so every job a worker holds is in the engine at once); plain Celery sends one
message per task, as its users do.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `bench`, `tasks`, ... importable
    sys.path.insert(0, str(REPO_ROOT))

import redis  # noqa: E402
import yaml  # noqa: E402

from bench.common import card_name, git_commit, log, today  # noqa: E402

DEFAULT_JOBS = 5000
DEFAULT_CONCURRENCY = 8
# Jobs per message on tideq's side; every job is still started, leased and stored on its own.
DEFAULT_JOBS_PER_MESSAGE = 16
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/12"  # a database nothing else uses
WARMUP_JOBS = 200
# The echo engine needs a tokenizer: the demo's small checkpoint, built when missing.
DEFAULT_MODEL = REPO_ROOT / ".tideq" / "models" / "tiny-llama"
WAIT_TIMEOUT_S = 600.0
RESULT_POLL_S = 0.05


class WorkerProcess:
    """A Celery worker process whose output goes to a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", *args, "--without-gossip", "--without-mingle",
             "--without-heartbeat", "-l", "info"],
            cwd=REPO_ROOT, env={**os.environ, **env, "PYTHONUNBUFFERED": "1"},
            stdout=self._log, stderr=subprocess.STDOUT,
        )  # fmt: skip

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log_path.read_text(errors="replace"):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited: {self.log_path.read_text(errors='replace')}")
            time.sleep(0.2)
        raise TimeoutError(f"worker not ready after {timeout}s (log: {self.log_path})")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def timed_batches(run_batch: Callable[[int], None], jobs: int, reps: int) -> list[float]:
    """Seconds of each of `reps` batches of `jobs`, after one warm-up batch."""
    run_batch(min(WARMUP_JOBS, jobs))
    seconds = []
    for _ in range(reps):
        t0 = time.perf_counter()
        run_batch(jobs)
        seconds.append(time.perf_counter() - t0)
    return seconds


def plain_celery(jobs: int, reps: int, concurrency: int, url: str, logs: Path) -> list[float]:
    os.environ["TIDEQ_BENCH_REDIS_URL"] = url  # read by plain_celery_app when imported
    from bench.plain_celery_app import noop

    worker = WorkerProcess(
        ["-A", "bench.plain_celery_app", "worker", "-P", "threads", "-c", str(concurrency)],
        {"TIDEQ_BENCH_REDIS_URL": url}, logs / "plain.log",
    )  # fmt: skip
    try:
        worker.wait_ready()

        def run_batch(n: int) -> None:
            results = [noop.delay(i) for i in range(n)]
            values = [r.get(timeout=WAIT_TIMEOUT_S) for r in results]
            if values != list(range(n)):
                raise RuntimeError("plain Celery returned wrong results")

        return timed_batches(run_batch, jobs, reps)
    finally:
        worker.stop()


def tideq(jobs: int, reps: int, concurrency: int, url: str, model: Path, tmp: Path,
          jobs_per_message: int) -> list[float]:
    from producer import Producer
    from tasks.config import load_config

    config_path = tmp / "queue.yaml"
    config_path.write_text(yaml.safe_dump({
        "redis": {"url": url},
        "model": {"path": str(model), "build_if_missing": False, "backend": "echo",
                  "dtype": "float32"},
        "num_gpus": 0,
        "num_workers": concurrency,
        "jobs_per_message": jobs_per_message,
        "batch_size_per_gpu": concurrency * jobs_per_message,
    }))  # fmt: skip
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"job {i}", "max_tokens": 4}) + "\n"
                               for i in range(jobs)))  # fmt: skip
    warmup = tmp / "warmup.jsonl"
    warmup.write_text("".join(prompts.read_text().splitlines(keepends=True)[:WARMUP_JOBS]))
    worker = WorkerProcess(["-A", "tasks", "worker", "-Q", "high,low"],
                           {"TIDEQ_CONFIG": str(config_path)}, tmp / "tideq.log")  # fmt: skip
    try:
        worker.wait_ready()
        with Producer(load_config(config_path)) as producer:

            def run_batch(n: int) -> None:
                report = producer.submit(prompts if n == jobs else warmup)
                status = producer.wait(report.batch_id, WAIT_TIMEOUT_S, poll_s=RESULT_POLL_S)
                rows = list(producer.results(report.batch_id))
                if not status.succeeded or len(rows) != n:
                    raise RuntimeError(f"tideq finished {status.count('done')} of {n} jobs")

            return timed_batches(run_batch, jobs, reps)
    finally:
        worker.stop()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=DEFAULT_JOBS)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=DEFAULT_CONCURRENCY,
                        help="worker threads, both sides")  # fmt: skip
    parser.add_argument("--jobs-per-message", type=int, default=DEFAULT_JOBS_PER_MESSAGE,
                        help="tideq's jobs_per_message (plain Celery sends one per task)")
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL,
                        help="checkpoint whose tokenizer the echo engine uses (built if missing)")
    parser.add_argument("--out", type=Path, default=None, help="JSON result file")
    args = parser.parse_args(argv)
    client = redis.Redis.from_url(args.redis_url)
    if client.dbsize():
        sys.exit(f"{args.redis_url} is not empty; pick a throwaway database (--redis-url)")
    from engine.random_checkpoint import ensure_checkpoint

    ensure_checkpoint(str(args.model))
    load_before = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            log(f"plain Celery: {args.jobs} no-op tasks x {args.reps}")
            plain = plain_celery(args.jobs, args.reps, args.concurrency, args.redis_url,
                                 Path(tmp))  # fmt: skip
            client.flushdb()
            log(f"tideq: {args.jobs} jobs x {args.reps}")
            ours = tideq(args.jobs, args.reps, args.concurrency, args.redis_url, args.model,
                         Path(tmp), args.jobs_per_message)  # fmt: skip
    finally:
        client.flushdb()
    ours_rate = args.jobs / statistics.median(ours)
    plain_rate = args.jobs / statistics.median(plain)
    record = {
        "workload": "W-queue",
        "model": "echo",
        "card": card_name("cpu"),
        "cpus": os.cpu_count(),
        "gpus": 0,
        "date": today(),
        "commit": git_commit(),
        "unit": "jobs/s",
        "project": ours_rate,
        "peers": {"plain_celery": plain_rate},
        "ratios": {"vs_plain_celery": ours_rate / plain_rate},
        "jobs": args.jobs,
        "concurrency": args.concurrency,
        "jobs_per_message": args.jobs_per_message,
        "seconds": {"tideq": ours, "plain_celery": plain},
        "load_average_before": load_before,
        "load_average_after": os.getloadavg()[0],
    }
    log(f"tideq {ours_rate:,.0f} jobs/s, plain Celery {plain_rate:,.0f} jobs/s: "
        f"x{ours_rate / plain_rate:.2f}")  # fmt: skip
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2) + "\n")
        log(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
