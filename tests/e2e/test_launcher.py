"""The launcher keeps its workers running: a worker that dies is started again, and the jobs
go on being served."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from producer import Producer
from tasks.config import load_config
from tests.conftest import REPO, write_config


def _wait_for(path: Path, pattern: str, count: int, timeout: float = 120.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = re.findall(pattern, path.read_text(errors="replace"))
        if len(found) >= count:
            return found
        time.sleep(0.2)
    raise TimeoutError(f"{pattern!r} x{count} not seen:\n{path.read_text(errors='replace')}")


def test_a_dead_worker_is_restarted_and_jobs_still_finish(tmp_path, redis_url, tiny_llama):
    config_path = write_config(tmp_path / "d.yaml", redis_url, tiny_llama, num_workers=2)
    log_path = tmp_path / "launch.log"
    with log_path.open("w") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "tasks.launch", "--config", str(config_path),
             "--loglevel", "warning"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    try:
        (first_pid,) = _wait_for(log_path, r"started cpu0 \(pid (\d+)\)", 1)
        os.kill(int(first_pid), signal.SIGKILL)
        pids = _wait_for(log_path, r"started cpu0 \(pid (\d+)\)", 2)
        assert pids[1] != first_pid
        assert "cpu0 exited with -9; restarting" in log_path.read_text()

        with Producer(load_config(config_path)) as producer:
            path = tmp_path / "p.jsonl"
            path.write_text(json.dumps({"prompt": "after the restart", "max_tokens": 4}) + "\n")
            batch = producer.submit(path)
            assert producer.wait(batch.batch_id, timeout=120).succeeded
            (result,) = producer.results(batch.batch_id)
            assert result["worker"].startswith("cpu0@")
    finally:
        launcher.send_signal(signal.SIGTERM)
        assert launcher.wait(60) == 0
