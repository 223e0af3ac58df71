"""How fast `producer submit` validates and enqueues a large prompt file (CPU only).

Writes N short prompts to a temporary JSONL file, submits them to a fresh batch on a throwaway
Redis database (which must be empty: it is flushed afterwards), and reports lines/s for the
validation pass, the enqueue pass and the whole submit. Nothing consumes the queue.

    python bench/bench_submit.py [--lines 100000] [--redis-url redis://127.0.0.1:6379/13]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import redis

from producer import Producer
from tasks.config import DeploymentConfig, RedisSettings

DEFAULT_LINES = 100_000
# A database nothing else uses; it is flushed when the benchmark ends.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/13"
DEFAULT_OUT = Path(__file__).parent / "results" / "2026-11-28_cpu-2core_W-submit.json"
# Every tenth line is a chat line, every fifth sets sampling parameters: a realistic mix.
CHAT_EVERY = 10
SAMPLING_EVERY = 5


def write_prompts(path: Path, n: int) -> int:
    """Write n short prompt lines; returns the file size in bytes."""
    with path.open("w", encoding="utf-8") as f:
        for i in range(n):
            line: dict[str, Any]
            if i % CHAT_EVERY == 0:
                line = {"messages": [{"role": "user", "content": f"Say hello to number {i}."}]}
            else:
                line = {"prompt": f"Write one sentence about the number {i}."}
            if i % SAMPLING_EVERY == 0:
                line.update(max_tokens=16, temperature=0.7, top_p=0.9, seed=i)
            f.write(json.dumps(line) + "\n")
    return path.stat().st_size


def run(lines: int, redis_url: str) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    if client.dbsize():
        sys.exit(f"{redis_url} is not empty; pick a throwaway database (--redis-url)")
    config = DeploymentConfig(redis=RedisSettings(url=redis_url))
    # Other work on the machine skews the figure; record how busy it was.
    load_before = os.getloadavg()[0]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "prompts.jsonl"
            size = write_prompts(path, lines)
            with Producer(config, client=client) as producer:
                started = time.perf_counter()
                report = producer.submit(path, priority="low")
                total_s = time.perf_counter() - started
            queued = client.llen("low")
            used_memory = client.info("memory")["used_memory"]
    finally:
        client.flushdb()
        client.close()
    assert report.new == lines and queued == lines, (report, queued)
    return {
        "benchmark": "producer submit (validate + enqueue), no consumer",
        "lines": lines,
        "file_bytes": size,
        "validate_s": round(report.validate_s, 3),
        "enqueue_s": round(report.enqueue_s, 3),
        "total_s": round(total_s, 3),
        "validate_lines_per_s": round(lines / report.validate_s),
        "enqueue_lines_per_s": round(lines / report.enqueue_s),
        "total_lines_per_s": round(lines / total_s),
        "redis_used_memory_bytes": used_memory,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1m_before": round(load_before, 2),
        "machine": platform.machine(),
        "redis_version": redis.Redis.from_url(redis_url).info("server")["redis_version"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=DEFAULT_LINES)
    parser.add_argument("--redis-url", default=DEFAULT_REDIS_URL)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()
    result = run(args.lines, args.redis_url)
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
