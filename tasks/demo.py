"""The whole path on one machine, end to end, with nothing set up beforehand:

    python -m tasks.demo [--config configs/default.yaml] [--prompts examples/prompts.jsonl]

Builds the small random model if it is missing, starts Redis if none answers, starts one
worker, submits the prompt file, waits with a progress bar, prints the results, and stops
what it started.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

from tasks.config import ConfigError, load_config
from tasks.redis_server import RedisUnavailableError, ensure_redis

REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "configs" / "default.yaml"
DEFAULT_PROMPTS = REPO / "examples" / "prompts.jsonl"
# A worker loads its model before it reports ready; the tiny default takes seconds.
_WORKER_READY_TIMEOUT_S = 300.0


def _start_worker(config_path: Path, log_path: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "TIDEQ_CONFIG": str(config_path)}
    with log_path.open("wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q", "high,low",
             "-n", "demo@%h", "--without-gossip", "--without-mingle", "-l", "info"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
        )


def _wait_ready(proc: subprocess.Popen[bytes], log_path: Path) -> None:
    deadline = time.monotonic() + _WORKER_READY_TIMEOUT_S
    while time.monotonic() < deadline:
        text = log_path.read_text(errors="replace")
        if " ready." in text:
            return
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited ({proc.returncode}):\n{text[-3000:]}")
        time.sleep(0.3)
    raise RuntimeError(f"the worker was not ready after {_WORKER_READY_TIMEOUT_S:.0f}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG))
    parser.add_argument("--prompts", default=str(DEFAULT_PROMPTS))
    args = parser.parse_args(argv)
    console = Console()

    try:
        config = load_config(args.config)
    except ConfigError as err:
        console.print(f"[red]error:[/] {err}")
        return 2
    os.chdir(REPO)  # the default model path is relative to the repository

    from producer import Producer
    from producer.cli import print_results, wait_with_progress

    started: list[subprocess.Popen[bytes]] = []
    try:
        try:
            redis_proc = ensure_redis(config.redis.url)
        except RedisUnavailableError as err:
            console.print(f"[red]error:[/] {err}")
            return 1
        if redis_proc is not None:
            started.append(redis_proc)
            console.print(f"started redis-server for {config.redis.url}")

        if config.model.build_if_missing:
            from engine.random_checkpoint import ensure_checkpoint

            with console.status(f"model: {config.model.path}"):
                ensure_checkpoint(config.model.path)

        log_path = Path(tempfile.mkdtemp(prefix="tideq-demo-")) / "worker.log"
        worker = _start_worker(Path(args.config).resolve(), log_path)
        started.append(worker)
        with console.status(f"starting a worker (log: {log_path})"):
            _wait_ready(worker, log_path)
        console.print(f"worker ready (log: {log_path})")

        with Producer(config) as producer:
            report = producer.submit(args.prompts)
            console.print(f"submitted {report.new} jobs from {args.prompts}:"
                          f" batch [bold]{report.batch_id}[/]")
            status = wait_with_progress(producer, report.batch_id, console)
            print_results(producer, report.batch_id, console, prompts_path=args.prompts)
        return 0 if status.succeeded else 1
    finally:
        for proc in reversed(started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()


if __name__ == "__main__":
    sys.exit(main())


