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


def _children(pid: int) -> list[int]:
    """Processes whose parent is pid (from /proc; the tests run on Linux)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    fields = stat.read().rsplit(") ", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry))
    return found


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie has exited; it waits only for its (dead) parent's reaper.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1].startswith("Z")


def test_a_killed_launcher_leaves_no_worker_behind(tmp_path, redis_url, tiny_llama):
    """kill -9 of the launcher: its workers (and their engine processes) stop too, instead
    of holding GPU memory for ever."""
    config_path = write_config(tmp_path / "d.yaml", redis_url, tiny_llama, num_workers=2)
    log_path = tmp_path / "launch.log"
    with log_path.open("w") as log:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "tasks.launch", "--config", str(config_path)],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    (pid,) = _wait_for(log_path, r"started cpu0 \(pid (\d+)\)", 1)
    _wait_for(log_path, r"cpu0@\S+ ready", 1)
    # The worker's engine core process (and multiprocessing's resource tracker).
    children = _children(int(pid))
    assert children
    launcher.kill()
    launcher.wait()
    deadline = time.monotonic() + 60
    while not all(_gone(p) for p in (int(pid), *children)):
        assert time.monotonic() < deadline, log_path.read_text()
        time.sleep(0.2)


def test_workers_are_named_after_their_gpu_group():
    from tasks.config import parse_config
    from tasks.launch import plan_workers

    config = parse_config({"num_gpus": 4, "gpus_per_worker": 2,
                           "model_shard_strategy": "tensor"})
    assert [(s.name, s.gpus) for s in plan_workers(config)] == [("gpu0-1", [0, 1]),
                                                                ("gpu2-3", [2, 3])]
    single = parse_config({"num_gpus": 2})
    assert [s.name for s in plan_workers(single)] == ["gpu0", "gpu1"]
