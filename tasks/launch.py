"""Start one pinned worker per GPU group and keep them running.

    python -m tasks.launch --config configs/x.yaml --num_gpus 4 [--dry-run]

Group g of size gpus_per_worker gets GPUs [g*k, (g+1)*k) through CUDA_VISIBLE_DEVICES, set
before its process starts, so each worker process sees only its own group. With
gpu_allocation_strategy "priority", the first high_only_workers groups consume only `high`.
A worker that dies is started again (its unacknowledged jobs are redelivered by Redis).
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

from tasks import keys
from tasks.config import ConfigError, DeploymentConfig, config_source, load_config
from tasks.metrics import WORKER_INDEX_ENV
from tasks.worker import GPUS_ENV

log = logging.getLogger("tideq.launch")

# A worker that dies sooner than this after its start is not restarted in a tight loop: the
# launcher waits this long first (a broken config would otherwise spin).
_RESTART_BACKOFF_S = 5.0
# prctl(2) option: the signal a process gets when its parent dies.
_PR_SET_PDEATHSIG = 1


@dataclass
class WorkerSpec:
    """One worker process of the deployment."""

    name: str
    gpus: list[int]
    queues: tuple[str, ...]
    index: int = 0

    def command(self, concurrency: int, loglevel: str) -> list[str]:
        return [sys.executable, "-m", "celery", "-A", "tasks", "worker",
                "-Q", ",".join(self.queues), "-P", "threads", "-c", str(concurrency),
                "-n", f"{self.name}@%h", "-l", loglevel]

    def env(self, config_path: str | None) -> dict[str, str]:
        env = dict(os.environ)
        env[WORKER_INDEX_ENV] = str(self.index)
        if config_path:
            env["TIDEQ_CONFIG"] = config_path
        if self.gpus:
            group = ",".join(str(g) for g in self.gpus)
            env[GPUS_ENV] = group
            env["CUDA_VISIBLE_DEVICES"] = group
        return env


def plan_workers(config: DeploymentConfig) -> list[WorkerSpec]:
    """The deployment's worker processes: one per GPU group (one CPU worker if num_gpus 0)."""
    if config.num_gpus == 0:
        return [WorkerSpec("cpu0", [], keys.QUEUES)]
    k = config.gpus_per_worker
    specs = []
    for g in range(config.num_worker_groups):
        high_only = (config.gpu_allocation_strategy == "priority"
                     and g < config.high_only_workers)
        queues = (keys.QUEUE_HIGH,) if high_only else keys.QUEUES
        gpus = list(range(g * k, (g + 1) * k))
        # Named after its GPUs: gpu3, or gpu2-3 for a group of two.
        name = f"gpu{gpus[0]}" if k == 1 else f"gpu{gpus[0]}-{gpus[-1]}"
        specs.append(WorkerSpec(name, gpus, queues, g))
    return specs


def gpus_present() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Start one pinned tideq worker per GPU group.")
    parser.add_argument("--config", help="deployment YAML (default: $TIDEQ_CONFIG or built-in)")
    parser.add_argument("--num_gpus", "--num-gpus", type=int, dest="num_gpus",
                        help="override the config's num_gpus")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    parser.add_argument("--loglevel", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    source = config_source(args.config)
    try:
        config = load_config(args.config)
        if args.num_gpus is not None:
            from tasks.config import parse_config

            data = config.model_dump()
            data["num_gpus"] = args.num_gpus
            config = parse_config(data, f"{source} (with --num_gpus {args.num_gpus})")
        config.check_hardware(gpus_present(), source)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    specs = plan_workers(config)
    config_path = os.path.abspath(args.config) if args.config else os.environ.get("TIDEQ_CONFIG")
    for spec in specs:
        print(f"{spec.name}: GPUs {spec.gpus or 'cpu'} queues {','.join(spec.queues)}:"
              f" {' '.join(spec.command(config.num_workers, args.loglevel))}")
    if args.dry_run:
        return 0
    if args.num_gpus is not None:
        # Workers read their settings from a YAML file: give them one with the override.
        config_path = _write_effective_config(config)
    return _supervise(specs, config, config_path, args.loglevel)


def _write_effective_config(config: DeploymentConfig) -> str:
    import tempfile

    import yaml

    fd, path = tempfile.mkstemp(prefix="tideq-", suffix=".yaml")
    with os.fdopen(fd, "w") as f:
        yaml.safe_dump(config.model_dump(), f)
    return path


def _supervise(specs: list[WorkerSpec], config: DeploymentConfig, config_path: str | None,
               loglevel: str) -> int:
    procs: dict[str, tuple[subprocess.Popen[bytes], float]] = {}
    stopping = False

    def start(spec: WorkerSpec) -> None:
        proc = subprocess.Popen(spec.command(config.num_workers, loglevel),
                                env=spec.env(config_path), preexec_fn=_die_with_parent)
        procs[spec.name] = (proc, time.monotonic())
        log.info("started %s (pid %d)", spec.name, proc.pid)

    def stop_all(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    for spec in specs:
        start(spec)
    while procs:
        time.sleep(1.0)
        for spec in specs:
            if spec.name not in procs:
                continue
            proc, started = procs[spec.name]
            if proc.poll() is None:
                continue
            if stopping:
                del procs[spec.name]
                continue
            log.warning("%s exited with %s; restarting", spec.name, proc.returncode)
            if time.monotonic() - started < _RESTART_BACKOFF_S:
                time.sleep(_RESTART_BACKOFF_S)
            start(spec)
    return 0


def _die_with_parent() -> None:
    """In the worker process before it starts: get SIGTERM when the launcher dies, however it
    dies (kill -9 included), so that no worker is left holding GPU memory. SIGTERM, not
    SIGKILL: the worker drains its running jobs and stops its engine processes."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(main())
