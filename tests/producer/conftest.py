"""Fixtures of the producer's tests. Redis comes from tests/conftest.py's `redis_url` (a
database of its own, flushed before and after each test)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer import Producer
from tasks.config import DeploymentConfig, LimitSettings, RedisSettings

REPO = Path(__file__).resolve().parents[2]
# Small limits so that out-of-range values are easy to write.
MAX_OUTPUT_TOKENS = 64
DEFAULT_MAX_TOKENS = 16
WORKER_READY_TIMEOUT_S = 60.0
WORKER_STOP_TIMEOUT_S = 15.0

Line = dict[str, Any] | str


@pytest.fixture
def config(redis_url: str) -> DeploymentConfig:
    return DeploymentConfig(
        redis=RedisSettings(url=redis_url),
        limits=LimitSettings(max_output_tokens=MAX_OUTPUT_TOKENS,
                             default_max_tokens=DEFAULT_MAX_TOKENS),
    )


@pytest.fixture
def producer(config: DeploymentConfig) -> Iterator[Producer]:
    with Producer(config) as p:
        yield p


@pytest.fixture
def rdb(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """write_jsonl([dict or raw str, ...], name="x.jsonl") -> path; dicts are JSON-encoded."""

    def write(lines: list[Line], name: str = "prompts.jsonl") -> Path:
        path = tmp_path / name
        text = "".join((json.dumps(x) if isinstance(x, dict) else x) + "\n" for x in lines)
        path.write_text(text, encoding="utf-8")
        return path

    return write


@pytest.fixture
def cli_env(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make `producer.cli.main` use the test database (and no config file)."""
    monkeypatch.delenv("TIDEQ_CONFIG", raising=False)
    monkeypatch.setenv("TIDEQ_REDIS_URL", redis_url)
    return redis_url


@pytest.fixture
def echo_worker(redis_url: str, tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """A real Celery worker process running tests/producer/celery_echo_app.py."""
    log_path = tmp_path / "echo-worker.log"
    env = {**os.environ, "TIDEQ_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.producer.celery_echo_app", "worker",
             "-P", "threads", "-c", "2", "-Q", "high,low", "-n", "echo@%h", "--without-gossip",
             "--without-mingle", "--without-heartbeat", "-l", "info"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + WORKER_READY_TIMEOUT_S
        while " ready." not in log_path.read_text(errors="replace"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"echo worker did not start:\n{log_path.read_text()}")
            time.sleep(0.1)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(WORKER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
