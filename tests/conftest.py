"""Shared fixtures: a real Redis the suite starts itself (flushed around each test), tiny real
checkpoints, and real Celery worker processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml

from tests.redis_proc import RedisProcess, redis_binary

REPO = Path(__file__).resolve().parent.parent

# One OpenMP thread per torch process (this one and every worker, engine core and benchmark
# it starts; set before torch is imported). The suite runs several torch processes at once on
# a machine of two cores: with a thread per core each, every op of a step waits for a thread
# that another process holds, and a tiny model's step that takes a millisecond took 100 ms
# and more (e2e tests 10x slower at random). The tiny models gain nothing from a second thread.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def redis_proc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisProcess]:
    """The suite's own redis-server (free port, AOF), shared by the tests that do not kill it."""
    if redis_binary() is None:
        pytest.skip("redis-server is not installed (Debian/Ubuntu: apt-get install"
                    " redis-server; scripts/setup.sh does it)")
    server = RedisProcess(tmp_path_factory.mktemp("redis"), fsync="everysec")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_server(redis_proc: RedisProcess) -> redis.Redis:
    return redis_proc.client()


@pytest.fixture
def redis_url(redis_proc: RedisProcess, redis_server: redis.Redis) -> Iterator[str]:
    # Our own server: flushing it touches nobody's data.
    redis_server.flushdb()
    yield redis_proc.url()
    redis_server.flushdb()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A redis-server for one test alone, which the test may kill -9 and restart."""
    if redis_binary() is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisProcess(tmp_path / "redis")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from engine.random_checkpoint import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny-llama"), arch="llama", shape="tiny")


def eventually(predicate: Callable[[], bool], what: str, patience_s: float = 20.0) -> None:
    """Wait until predicate() holds; fail naming `what` after patience_s seconds (how long a
    step may take before the test gives up, not a measurement)."""
    deadline = time.monotonic() + patience_s
    while not predicate():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.005)


def write_config(path: Path, redis_url: str, model_path: Path, **overrides: Any) -> Path:
    """A deployment YAML for tests: CPU, the given model, small limits."""
    data: dict[str, Any] = {
        "redis": {"url": redis_url, "visibility_timeout_s": 3600},
        "model": {"path": str(model_path), "build_if_missing": False, "dtype": "float32",
                  "max_model_len": 512},
        "limits": {"max_prompt_tokens": 384, "max_output_tokens": 256, "default_max_tokens": 16},
        "num_gpus": 0,
        "batch_size_per_gpu": 8,
        "num_workers": 8,
        "cancel_poll_s": 0.1,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    path.write_text(yaml.safe_dump(data))
    return path


class WorkerProcess:
    """A real `celery -A tasks worker` process; its log goes to a file for failure reports."""

    def __init__(self, config_path: Path, log_path: Path, queues: str, concurrency: int,
                 name: str, heartbeat: bool = False) -> None:
        env = {**os.environ, "TIDEQ_CONFIG": str(config_path), "PYTHONUNBUFFERED": "1"}
        env.pop("TIDEQ_REDIS_URL", None)
        self.log_path = log_path
        self._log = log_path.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", queues,
             "-c", str(concurrency), "-n", f"{name}@%h", "--without-gossip",
             "--without-mingle", *([] if heartbeat else ["--without-heartbeat"]), "-l", "info"],
            cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if " ready." in self.log():
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"worker exited with {self.proc.returncode}:\n{self.log()}")
            # Often: a ready worker takes jobs at once, and tests that act on it mid-batch
            # must see it early.
            time.sleep(0.02)
        raise TimeoutError(f"worker not ready after {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start real worker processes: start_worker(config_path, queues="high,low", concurrency=8).

    heartbeat=True keeps the worker's event heartbeats, as a production worker has them (the
    tests' workers run without, for speed); monitors such as Flower need them."""
    workers: list[WorkerProcess] = []

    def start(config_path: Path, queues: str = "high,low", concurrency: int = 8,
              wait: bool = True, heartbeat: bool = False) -> WorkerProcess:
        name = f"w{len(workers)}"
        worker = WorkerProcess(config_path, tmp_path / f"{name}.log", queues, concurrency, name,
                               heartbeat)
        workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in workers:
        worker.stop()
