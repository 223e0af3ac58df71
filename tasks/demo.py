"""The whole path on one machine, end to end, with nothing set up beforehand:

    python -m tasks.demo [--config configs/default.yaml] [--prompts examples/prompts.jsonl]

Builds the small random model if it is missing, starts Redis if none answers, starts one
worker, submits the prompt file, waits with a progress bar, prints the results, and stops
what it started.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

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


def _print_results(console: Console, results: list[dict[str, Any]], prompts_path: str) -> None:
    """One row per job: what was asked, what came back."""
    asked = {}
    with open(prompts_path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                row = json.loads(line)
                body = row.get("body", row)
                asked[number] = body.get("prompt") or body["messages"][-1]["content"]
    table = Table(title="results", show_lines=True)
    for column in ("line", "prompt", "output", "finish", "tokens", "seconds"):
        table.add_column(column)
    for r in results:
        text = r.get("text")
        if text is None and r.get("response"):
            choice = r["response"]["body"]["choices"][0]
            text = choice.get("text") or choice.get("message", {}).get("content")
        usage = r.get("usage") or {}
        table.add_row(
            str(r.get("line", "")), str(asked.get(r.get("line", 0), ""))[:40],
            repr(text if text is not None else r.get("error")),
            str(r.get("finish_reason", r.get("state"))),
            f"{usage.get('prompt_tokens', '')}+{usage.get('completion_tokens', '')}",
            f"{(r.get('timing') or {}).get('total_s', 0):.3f}",
        )
    console.print(table)


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
    from producer import cli as producer_cli

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
            code = producer_cli.main(["wait", report.batch_id, "--config", args.config])
            _print_results(console, list(producer.results(report.batch_id)), args.prompts)
        return code
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


