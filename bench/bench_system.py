"""The whole system measured the way users run it, in one run on one machine (BENCHMARKS.md):

    W-system     2,048 text prompts (40-470 tokens with the model's tokenizer), 128 output
                 tokens each, greedy, as ONE JSONL file given to `producer submit`, through
                 Redis and ONE worker started as the README says (`TIDEQ_CONFIG=cfg celery -A
                 tasks worker -Q high,low`), until the last result is in Redis: output
                 tokens/s. Then the engine alone (`Engine(engine_config_for(config))`, the same
                 deployment config, the same prompts turned into the same requests): ratio
                 `vs_engine_alone`.
    W-scale      the same workload x N through the launcher (`python -m tasks.launch --config
                 CFG --num_gpus N`), one file per N: ratio `vs_n_times_1gpu`. With
                 --gpus-per-worker 1,2 also workers of two tensor-sharded GPUs at each N
                 that two divides (`8gpu-tp2`): ratio `vs_single_gpu_workers`, against
                 the one-GPU workers on the same N in the same run.
    W-priority   a `low` flood of at least twice what the workers finish in the measuring
                 window, then 50 `high` jobs (128-token prompt, 128 output tokens) one every
                 200 ms, each its own `Producer.submit`; the same 50 jobs on the idle workers
                 first. For `gpu_allocation_strategy` priority and even: `high_p99_vs_idle`,
                 and low throughput in the window (`low_throughput_vs_even`).
    reliability  N jobs (4,096) through one worker: every job done, none stuck, the batch
                 counters add up; with --kill-worker the worker is killed (-9) mid-run and a
                 new one started: time until every killed job ran again, jobs lost (0).

EOS: a job line cannot ask to ignore EOS, so the model is given through a copy of the
checkpoint folder whose config.json and generation_config.json name no EOS token (the weights
and tokenizer are links to the original). The engine then never ends a sequence early, as
with ignore_eos; every run checks that each job returned exactly max_tokens tokens.

Redis: the bench owns the database it is given and flushes it (before, between deployments,
after). On a machine without CUDA a non-empty database is refused unless --flush-redis.

    python bench/bench_system.py --workload system,reliability --model 1b --out DIR
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import secrets
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `bench`, `tasks`, ... importable
    sys.path.insert(0, str(REPO_ROOT))

import redis  # noqa: E402
import yaml  # noqa: E402

from bench.common import (  # noqa: E402
    DEFAULT_RESULTS_DIR,
    Deadline,
    card_name,
    git_commit,
    log,
    print_table,
    today,
    versions,
    write_result,
)

WORKLOADS = ("system", "reliability", "scale", "priority")  # the order of --workload all
WORKLOAD_IDS = {"system": "W-system", "scale": "W-scale", "priority": "W-priority",
                "reliability": "reliability"}
MODELS = ("tiny", "1b", "8b", "config")
# W-priority: prompts made before the flood for its top-up, in floods' worth.
FLOOD_RESERVE = 3
STRATEGIES = ("priority", "even")  # priority first: its file is the one the target is about
DEFAULT_CONFIG = REPO_ROOT / "configs" / "gpu-1x.yaml"

# Default --time-budget on a GPU: one device command may run 600 s; the bench stops waiting
# when the budget is spent, and stopping the workers then takes up to STOP_GRACE_S.
GPU_TIME_BUDGET_S = 520.0
# A phase that starts workers is not begun with less budget left than this (a 1b worker
# loads, captures its CUDA graphs and warms up in well under a minute on an H200).
GPU_MIN_PHASE_S = 75.0
WORKER_START_TIMEOUT_S = 300.0
# Seconds between polls of a batch's counters; results carry their own timestamps, so the
# poll only decides when the bench looks, not what it measures.
POLL_S = 0.2
# Seconds between samples of the workers' metrics and the batch counters.
SAMPLE_S = 0.5
# A stopped deployment gets this long for Celery's warm shutdown, then its group is killed.
STOP_GRACE_S = 15.0
INTERRUPTED_GRACE_S = 3.0
# Warm-up: batches of warmup_jobs, each of fresh prompts, until one runs within WARM_STEADY of
# the one before (at least 2, at most max_warmups). A fresh machine compiles Triton kernels for
# new shapes during the first thousands of jobs (each later process finds them in the disk
# cache): a fixed small warm-up left the first timed runs of a cold worker at half speed.
WARM_STEADY = 0.10
# Percentiles of finish times between which the steady throughput is taken (the ramp-up and
# the tail of a batch, where the engine is not full, are left out).
STEADY_FROM, STEADY_TO = 0.1, 0.9
READY_RE = re.compile(r"(\S+@\S+) ready\.")

# Words of the generated prompts: plain English, so that the byte-level BPE of the random
# checkpoints splits them as it would real text (about 1.5 tokens a word).
_WORD_TEXT = """
the of and to in is that for it as with was on be by this are from at or an have not which
but all were when there can more one has been if their so will would what about out up into
than them some time only other new could these two may first then do any like now over such
our even most made after also did many before must through back years where much way well
down should because each just those people how too little state good very make world still
own see work long get here between both life being under never day same another know while
last might great old year off come since against right used take three queue worker batch
token model engine result river tide harbor signal market garden window letter number system
question value reason answer morning evening paper music light water stone city road field
small large early late open close start finish write read send carry follow measure
"""
WORDS = tuple(_WORD_TEXT.split())


class Interrupted(Exception):
    """SIGTERM (e.g. from `timeout`): stop, write what was measured."""


class PhaseSkipped(Exception):
    """A phase that the time budget does not allow (its file says so)."""


class NotOnThisMachine(PhaseSkipped):
    """A phase this machine cannot run (too few GPUs, or none): no file is written for it, so
    that a result of another machine is never overwritten by an empty one."""


# --- sizes -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Sizes:
    jobs: int = 2048  # W-system jobs per timed run (x N for W-scale)
    prompt_min: int = 40
    prompt_max: int = 470  # inclusive
    max_tokens: int = 128
    warmup_jobs: int = 512
    max_warmups: int = 6
    reps: int = 3
    high_jobs: int = 50
    high_interval_s: float = 0.2
    high_prompt_tokens: int = 128
    flood_jobs: int = 4096  # per worker; topped up when the workers finish faster
    flood_lead_s: float = 5.0  # the flood runs this long before the first high job
    reliability_jobs: int = 4096
    reliability_tokens: int = 128
    kill_at: float = 0.3  # --kill-worker: kill once this share of the jobs is done


# --quick: the same code paths in seconds on a CPU (the smoke test).
QUICK = Sizes(jobs=16, max_tokens=8, warmup_jobs=4, max_warmups=1, reps=1, high_jobs=6,
              high_interval_s=0.05, high_prompt_tokens=32, flood_jobs=64, flood_lead_s=1.0,
              # 32 tokens a job: with 8 the warm worker could finish all 32 jobs between two
              # of the kill's polls on a loaded machine, and --kill-worker then killed nothing.
              reliability_jobs=32, reliability_tokens=32)


# --- processes -------------------------------------------------------------------------------
def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, read from /proc (Linux); elsewhere
    whether the group answers a signal at all."""
    proc = Path("/proc")
    if not proc.is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except (ProcessLookupError, PermissionError):
            return []
    out = []
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
        rest = stat.rpartition(")")[2].split()
        if len(rest) > 2 and int(rest[2]) == pgid and rest[0] not in ("Z", "X"):
            out.append(int(entry.name))
    return out


def wait_group_gone(pgid: int, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while group_members(pgid):
        if time.monotonic() > end:
            return False
        time.sleep(0.1)
    return True


class Managed:
    """A process the bench started, leader of a process group of its own (a launcher's workers
    share it), its output in a log file. Stopped by signalling the whole group."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log_path: Path) -> None:
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        with log_path.open("ab") as out:
            self.proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.pgid = self.proc.pid
        self.started = time.monotonic()
        self.stopped = False

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready_names(self) -> set[str]:
        return set(READY_RE.findall(self.log_text()))

    def _signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pgid, sig)

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """SIGTERM to the group (Celery's warm shutdown), SIGKILL after `grace` seconds."""
        if self.stopped:
            return
        self.stopped = True
        if group_members(self.pgid):
            self._signal(signal.SIGTERM)
            if not wait_group_gone(self.pgid, grace):
                log(f"{self.name}: still running {grace:.0f}s after SIGTERM; SIGKILL")
                self._signal(signal.SIGKILL)
                wait_group_gone(self.pgid, 10.0)
        try:
            self.proc.wait(5.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def kill9(self) -> None:
        """kill -9 the whole group at once, as a crash would."""
        self.stopped = True
        self._signal(signal.SIGKILL)
        self.proc.wait()
        wait_group_gone(self.pgid, 10.0)


def free_port_block(n: int, tries: int = 50) -> int:
    """A port p such that p .. p+n-1 are free now (the launcher gives worker g port p+g)."""
    for _ in range(tries):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = int(s.getsockname()[1])
        if base + n > 65535:
            continue
        ok = True
        for port in range(base + 1, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError(f"no block of {n} free ports found")


# --- prompts ---------------------------------------------------------------------------------
class PromptMaker:
    """Deterministic English-like text cut to a token count with the model's own tokenizer,
    counted as the engine counts it (`tokenizer.encode(prompt)`)."""

    def __init__(self, checkpoint: Path) -> None:
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(checkpoint))

    def count(self, text: str) -> int:
        return len(self.tok.encode(text))

    @staticmethod
    def _sentences(rng: random.Random, words: int) -> str:
        out: list[str] = []
        while words > 0:
            n = rng.randint(6, 16)
            sentence = [rng.choice(WORDS) for _ in range(n)]
            sentence[0] = sentence[0].capitalize()
            if n > 9 and rng.random() < 0.4:
                sentence[n // 2] += ","
            out.append(" ".join(sentence) + ".")
            words -= n
        return " ".join(out)

    def make(self, rng: random.Random, target: int) -> tuple[str, int]:
        """A text of `target` tokens (exactly, but for a rare off-by-one at the cut)."""
        text = self._sentences(rng, target)
        while True:
            enc = self.tok(text, add_special_tokens=False, return_offsets_mapping=True)
            if len(enc["input_ids"]) > target + 4:
                break
            text += " " + self._sentences(rng, target)
        offsets = enc["offset_mapping"]
        want, best = target, ("", -1)
        for _ in range(6):
            cut = text[: offsets[want][0]].rstrip()
            n = self.count(cut)
            if abs(n - target) < abs(best[1] - target):
                best = (cut, n)
            if n == target:
                break
            want = max(1, min(want + target - n, len(offsets) - 1))
        return best


@dataclass
class PromptFile:
    path: Path
    jobs: int
    max_tokens: int
    prompt_tokens: list[int]

    def stats(self) -> dict[str, Any]:
        t = self.prompt_tokens
        return {"file": self.path.name, "jobs": self.jobs, "max_tokens": self.max_tokens,
                "prompt_tokens_min": min(t), "prompt_tokens_max": max(t),
                "prompt_tokens_mean": statistics.fmean(t), "prompt_tokens_total": sum(t)}


def write_prompt_file(maker: PromptMaker, path: Path, seed: str, jobs: int,
                      lengths: tuple[int, int], max_tokens: int) -> PromptFile:
    """`jobs` plain prompt lines, prompt lengths uniform in `lengths` (inclusive), greedy."""
    rng = random.Random(seed)
    counts = []
    with path.open("w", encoding="utf-8") as f:
        for _ in range(jobs):
            text, n = maker.make(rng, rng.randint(*lengths))
            counts.append(n)
            f.write(json.dumps({"prompt": text, "max_tokens": max_tokens, "temperature": 0})
                    + "\n")
    return PromptFile(path, jobs, max_tokens, counts)


# --- statistics ------------------------------------------------------------------------------
def percentile(values: Iterable[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); q in [0, 1]."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def dist(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"n": 0}
    return {"n": len(values), "mean": statistics.fmean(values), "p50": percentile(values, 0.5),
            "p90": percentile(values, 0.9), "p99": percentile(values, 0.99),
            "max": max(values)}


def ffloat(fields: dict[str, str], key: str) -> float | None:
    value = fields.get(key)
    try:
        return float(value) if value not in (None, "") else None
    except ValueError:
        return None


def summarize_jobs(records: list[Any], t_submit: float, max_tokens: int) -> dict[str, Any]:
    """A batch's figures from its job records. Times are wall-clock (time.time()) of this
    machine: the producer's submitted_at, the worker's started_at / finished_at."""
    states = Counter(r.state for r in records)
    done = [r for r in records if r.state == "done" and r.result]
    tokens = sum(int(r.result.get("completion_tokens", 0)) for r in done)
    finished = sorted(t for r in records if (t := ffloat(r.fields, "finished_at")) is not None)
    started = [t for r in records if (t := ffloat(r.fields, "started_at")) is not None]
    out: dict[str, Any] = {
        "jobs": len(records), "states": dict(states), "output_tokens": tokens,
        "short_outputs": sum(int(r.result.get("completion_tokens", 0)) != max_tokens
                             for r in done),
        "finish_reasons": dict(Counter(str(r.result.get("finish_reason")) for r in done)),
        "redelivered_jobs": sum(int(r.fields.get("deliveries", 0) or 0) > 0 for r in records),
    }
    if not finished:
        return out
    span = finished[-1] - t_submit
    out.update({
        "seconds": span,
        "tokens_per_s": tokens / span if span > 0 else None,
        "jobs_per_s": len(done) / span if span > 0 else None,
        "first_started_s": min(started) - t_submit if started else None,
        "first_finished_s": finished[0] - t_submit,
        "last_finished_s": span,
    })
    if started:
        # The same figure from the first job started on, without the submission's cost.
        from_start = finished[-1] - min(started)
        out["tokens_per_s_from_first_start"] = tokens / from_start if from_start > 0 else None
    by_finish = sorted((ffloat(r.fields, "finished_at") or 0.0,
                        int(r.result.get("completion_tokens", 0))) for r in done)
    lo, hi = int(len(by_finish) * STEADY_FROM), int(len(by_finish) * STEADY_TO) - 1
    if hi > lo and by_finish[hi][0] > by_finish[lo][0]:
        steady_tokens = sum(n for _, n in by_finish[lo + 1 : hi + 1])
        out["steady_tokens_per_s"] = steady_tokens / (by_finish[hi][0] - by_finish[lo][0])
    waits, totals, engine_queue, ttft = [], [], [], []
    for r in done:
        sub, st, fin = (ffloat(r.fields, k) for k in ("submitted_at", "started_at",
                                                      "finished_at"))
        if sub is not None and st is not None:
            waits.append(st - sub)
        if sub is not None and fin is not None:
            totals.append(fin - sub)
        engine_queue.append(float(r.result.get("queued_s", 0.0)))
        ttft.append(float(r.result.get("first_token_s", 0.0)))
    out["queue_wait_s"] = dist(waits)  # submitted -> a worker thread started it
    out["job_latency_s"] = dist(totals)  # submitted -> its result stored
    out["engine_queued_s"] = dist(engine_queue)  # in the engine: submit -> first scheduled
    out["engine_first_token_s"] = dist(ttft)
    prompt = [int(r.result.get("prompt_tokens", 0)) for r in done]
    out["prompt_tokens"] = dist([float(p) for p in prompt])
    out["workers"] = dict(Counter(str(r.result.get("worker")) for r in done))
    return out


# --- the metrics sampler ---------------------------------------------------------------------
def read_metrics(port: int) -> dict[str, float]:
    """The engine gauges of one worker's Prometheus endpoint."""
    out: dict[str, float] = {}
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=0.4) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith("tideq_engine_"):
                name, _, value = line.partition(" ")
                try:
                    out[name.removeprefix("tideq_engine_")] = float(value)
                except ValueError:
                    continue
    return out


class Sampler:
    """Every SAMPLE_S: the workers' running/waiting sequences (their metrics endpoints) and
    the watched batch's running/done counters (Redis). Cheap: two small reads a worker."""

    def __init__(self, ports: list[int], client: redis.Redis) -> None:
        self.ports = ports
        self.client = client
        self.batch_id: str | None = None
        self.samples: list[dict[str, Any]] = []
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)

    def _run(self) -> None:
        from tasks import keys

        while not self._stop.wait(SAMPLE_S):
            sample: dict[str, Any] = {"t": time.time()}
            running = waiting = 0.0
            for port in self.ports:
                try:
                    m = read_metrics(port)
                except OSError:
                    self.errors += 1
                    continue
                running += m.get("running", 0.0)
                waiting += m.get("waiting", 0.0)
            sample["running"], sample["waiting"] = running, waiting
            batch = self.batch_id
            if batch is not None:
                try:
                    counts = self.client.hgetall(keys.batch_key(batch))
                except redis.RedisError:
                    counts = {}
                c = {k.decode(): v.decode() for k, v in counts.items()}
                sample["jobs_running"] = sum(int(v) for k, v in c.items()
                                             if k.endswith(":running"))
                sample["jobs_done"] = sum(int(v) for k, v in c.items() if k.endswith(":done"))
            self.samples.append(sample)

    def summary(self, t0: float, t1: float) -> dict[str, Any]:
        """The samples taken in [t0, t1] (wall clock), times relative to t0."""
        sel = [s for s in self.samples if t0 <= s["t"] <= t1]
        if not sel:
            return {"samples": 0}
        out: dict[str, Any] = {
            "samples": len(sel), "interval_s": SAMPLE_S, "metric_errors": self.errors,
            "engine_running_mean": statistics.fmean(s["running"] for s in sel),
            "engine_running_max": max(s["running"] for s in sel),
            "engine_waiting_mean": statistics.fmean(s["waiting"] for s in sel),
        }
        held = [s["jobs_running"] for s in sel if "jobs_running" in s]
        if held:
            # Jobs the worker threads hold (started, result not yet stored): when this is well
            # above the engine's running count, the time goes in the task path, not the engine.
            out["jobs_running_mean"] = statistics.fmean(held)
        out["series"] = [[round(s["t"] - t0, 2), s["running"], s["waiting"],
                          s.get("jobs_running"), s.get("jobs_done")] for s in sel]
        out["series_columns"] = ["t_s", "engine_running", "engine_waiting", "jobs_running",
                                 "jobs_done"]
        return out


# --- the run's context -----------------------------------------------------------------------
@dataclass
class Context:
    args: argparse.Namespace
    sizes: Sizes
    deadline: Deadline
    workdir: Path
    redis_url: str
    client: redis.Redis
    config_data: dict[str, Any]  # --config with the model path and Redis URL of this run
    model: str
    checkpoint: Path
    maker: PromptMaker
    card: str
    on_gpu: bool
    device_count: int
    base: dict[str, Any]
    run_id: str
    procs: list[Managed] = field(default_factory=list)
    records: dict[str, tuple[dict[str, Any], str | None]] = field(default_factory=dict)
    prompt_files: dict[str, PromptFile] = field(default_factory=dict)
    shared_worker: tuple[Path, Managed] | None = None
    control: Any = None
    failed_checks: list[str] = field(default_factory=list)

    # processes
    def child_env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("TIDEQ_REDIS_URL",
                                                                 "TIDEQ_CONFIG")}
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> Managed:
        proc = Managed(name, cmd, env, self.workdir / f"{name}.log")
        self.procs.append(proc)
        log(f"started {name} (pid {proc.pgid}): {' '.join(cmd[1:])}")
        return proc

    def stop_all(self, grace: float) -> None:
        for proc in reversed(self.procs):
            if not proc.stopped:
                log(f"stopping {proc.name}")
                proc.stop(grace)

    # budget
    def min_phase_s(self) -> float:
        return GPU_MIN_PHASE_S if self.on_gpu else 0.0

    def check_budget(self, what: str, need: float | None = None) -> None:
        need = self.min_phase_s() if need is None else need
        if self.deadline.remaining() < need:
            raise PhaseSkipped(f"time budget: {self.deadline.remaining():.0f}s left, {what}"
                               f" needs about {need:.0f}s")

    def wait_left(self, cap: float) -> float:
        return max(1.0, min(cap, self.deadline.remaining()))

    # Redis and configs
    def flush(self) -> None:
        self.client.flushdb()

    def write_config(self, name: str, overrides: dict[str, Any] | None = None,
                     workers: int = 1) -> Path:
        """A copy of the deployment config for one phase (validated as workers would)."""
        from tasks.config import parse_config

        data = deep_merge(self.config_data, overrides or {})
        if self.args.metrics:
            data["metrics_port"] = free_port_block(workers)
        path = self.workdir / f"{name}.yaml"
        parse_config(data, str(path))
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    def prompt_file(self, name: str, jobs: int, lengths: tuple[int, int] | None = None,
                    max_tokens: int | None = None) -> PromptFile:
        if name not in self.prompt_files:
            t0 = time.perf_counter()
            s = self.sizes
            pf = write_prompt_file(self.maker, self.workdir / f"{name}.jsonl",
                                   f"{self.args.seed}:{name}", jobs,
                                   lengths or (s.prompt_min, s.prompt_max),
                                   max_tokens or s.max_tokens)
            self.prompt_files[name] = pf
            st = pf.stats()
            log(f"prompts {name}: {jobs} jobs, {st['prompt_tokens_min']}-"
                f"{st['prompt_tokens_max']} tokens (mean {st['prompt_tokens_mean']:.0f}),"
                f" {time.perf_counter() - t0:.1f}s")
        return self.prompt_files[name]

    # records
    def record(self, key: str, workload: str, gpus: int, unit: str,
               suffix: str | None = None, **extra: Any) -> dict[str, Any]:
        rec: dict[str, Any] = {
            "workload": WORKLOAD_IDS[workload], "model": self.model, **self.base,
            "gpus": gpus, "unit": unit, "project": None, "peers": {}, "ratios": {},
            **extra, "settings": {}, "errors": {}, "skipped": {}, "details": {},
        }
        self.records[key] = (rec, suffix)
        return rec

    def save(self, key: str) -> None:
        rec, suffix = self.records[key]
        write_result(self.args.out, rec, suffix)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k),
                                                                               dict) else v
    return out


# --- workers and the producer ----------------------------------------------------------------
def ping_names(ctx: Context) -> set[str]:
    """Workers answering a Celery ping on this run's Redis (a worker answers once its consumer
    runs, whatever its log level)."""
    if ctx.control is None:
        from celery import Celery

        from tasks.app import celery_settings
        from tasks.config import parse_config

        app = Celery("tideq-bench")
        app.conf.update(celery_settings(parse_config(ctx.config_data)))
        ctx.control = app
    try:
        replies = ctx.control.control.ping(timeout=0.5) or []
    except Exception as err:  # a broker hiccup while a worker starts: try again next poll
        log(f"  ping failed: {type(err).__name__}: {err}")
        return set()
    return {name for reply in replies for name in reply}


def wait_ready(ctx: Context, proc: Managed, n: int) -> float:
    """Until n workers are consuming; returns seconds since the process started."""
    end = time.monotonic() + min(WORKER_START_TIMEOUT_S, max(ctx.deadline.remaining(), 30.0))
    while True:
        names = proc.ready_names()
        if len(names) < n:
            names |= ping_names(ctx)
        if len(names) >= n:
            seconds = time.monotonic() - proc.started
            log(f"{proc.name}: {len(names)} worker(s) ready after {seconds:.1f}s")
            return seconds
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.tail()}")
        if "start-up failed" in proc.log_text():
            raise RuntimeError(f"{proc.name}: worker start-up failed:\n{proc.tail()}")
        if time.monotonic() > end:
            raise TimeoutError(f"{proc.name}: {len(names)} of {n} worker(s) ready after"
                               f" {time.monotonic() - proc.started:.0f}s:\n{proc.tail()}")
        time.sleep(0.5)


def start_worker(ctx: Context, config: Path, name: str) -> tuple[Managed, float]:
    """One worker exactly as the README starts it: TIDEQ_CONFIG=cfg celery -A tasks worker
    -Q high,low (the `celery` of this interpreter, run as `python -m celery`)."""
    proc = ctx.start(name, [sys.executable, "-m", "celery", "-A", "tasks", "worker", "-Q",
                            "high,low"], ctx.child_env(TIDEQ_CONFIG=str(config)))
    return proc, wait_ready(ctx, proc, 1)


def start_launcher(ctx: Context, config: Path, n: int, name: str) -> tuple[Managed, float]:
    """python -m tasks.launch --config CFG --num_gpus N: one pinned worker per GPU group."""
    proc = ctx.start(name, [sys.executable, "-m", "tasks.launch", "--config", str(config),
                            "--num_gpus", str(n)], ctx.child_env())
    return proc, wait_ready(ctx, proc, worker_groups(config, n))


def worker_groups(config: Path, gpus: int) -> int:
    """Workers the launcher starts on `gpus` GPUs with this config: one per gpus_per_worker."""
    per_worker = int(yaml.safe_load(config.read_text()).get("gpus_per_worker") or 1)
    return max(gpus // per_worker, 1)


def metrics_ports(config: Path, gpus: int) -> list[int]:
    """The workers' Prometheus ports (metrics_port + group index), one per worker group."""
    port = yaml.safe_load(config.read_text()).get("metrics_port")
    return [] if port is None else [int(port) + g for g in range(worker_groups(config, gpus))]


def cli_submit(ctx: Context, config: Path, pf: PromptFile, batch_id: str,
               priority: str = "low") -> dict[str, Any]:
    """`producer submit FILE --config CFG` as a user types it (`python -m producer.cli` is the
    console script's module). Returns when it has enqueued, with its wall-clock start."""
    cmd = [sys.executable, "-m", "producer.cli", "submit", str(pf.path), "--config",
           str(config), "--priority", priority, "--batch-id", batch_id]
    t_wall = time.time()
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=ctx.child_env(), capture_output=True,
                          text=True, timeout=ctx.wait_left(300.0))
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"producer submit exited with {proc.returncode}: "
                           f"{proc.stderr[-2000:]}")
    if proc.stdout.strip() != batch_id:
        raise RuntimeError(f"producer submit printed {proc.stdout.strip()!r}, not {batch_id}")
    report = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    return {"submit_start": t_wall, "cli_s": seconds, "cli_report": report}


def wait_batch(ctx: Context, producer: Any, batch_id: str, timeout: float,
               until: Callable[[Any], bool] | None = None, poll: float = POLL_S) -> Any:
    """Poll the batch until it is finished (or `until(status)`), the timeout or the budget;
    returns the last status (check .finished)."""
    end = time.monotonic() + min(timeout, max(ctx.deadline.remaining(), 1.0))
    while True:
        status = producer.status(batch_id)
        if status.finished or (until is not None and until(status)):
            return status
        if time.monotonic() > end:
            log(f"  batch {batch_id}: {status.finished_count}/{status.total} finished when the"
                " wait ended (timeout or time budget)")
            return status
        time.sleep(poll)


def timed_batch(ctx: Context, producer: Any, config: Path, pf: PromptFile, batch_id: str,
                sampler: Sampler | None) -> dict[str, Any]:
    """Submit one file with the CLI, wait until its last result is in Redis, read every
    record: the batch's figures."""
    if sampler is not None:
        sampler.batch_id = batch_id
    sub = cli_submit(ctx, config, pf, batch_id)
    status = wait_batch(ctx, producer, batch_id, timeout=3600.0)
    records = list(producer.store.iter_jobs(batch_id))
    out = {**sub, "batch_id": batch_id, "complete": bool(status.finished),
           **summarize_jobs(records, sub["submit_start"], pf.max_tokens)}
    out.pop("submit_start")
    if sampler is not None and "seconds" in out:
        out["samples"] = sampler.summary(sub["submit_start"],
                                         sub["submit_start"] + out["seconds"])
    if not status.finished:
        raise RuntimeError(f"batch {batch_id}: {status.finished_count} of {status.total}"
                           " finished before the time budget ran out")
    return out


def steady(values: list[float]) -> bool:
    """The last warm-up ran within WARM_STEADY of the one before."""
    return len(values) >= 2 and values[-2] > 0 and abs(values[-1] - values[-2]) <= (
        WARM_STEADY * values[-2])


def median_of(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return float(statistics.median(values)) if values else None


# --- the engine alone ------------------------------------------------------------------------
def engine_alone_child(spec_path: Path) -> int:
    """In a process of its own (the bench process never touches the device): the worker's
    engine config on the same prompts, each line turned into the request a worker builds."""
    from concurrent.futures import wait as wait_futures

    from engine.engine import Engine
    from producer.formats import LineParser
    from tasks.config import load_config
    from tasks.jobs import build_request
    from tasks.worker import engine_config_for

    spec = json.loads(spec_path.read_text())
    out_path = Path(spec["out"])
    end = time.monotonic() + float(spec["budget_s"])
    config = load_config(spec["config"])
    limits = config.limits
    parser = LineParser(limits.max_output_tokens, limits.default_max_tokens)
    result: dict[str, Any] = {"engine_config": None, "runs": []}

    def save() -> None:
        tmp = out_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, default=str))
        tmp.replace(out_path)

    def requests(path: str, tag: str) -> list[Any]:
        reqs = []
        with open(path, "rb") as f:
            for number, raw in enumerate(f, start=1):
                if raw.strip():
                    payload = parser.parse(raw, number).request("low")
                    reqs.append(build_request(f"{tag}:L{number}", payload,
                                              limits.default_max_tokens))
        return reqs

    t0 = time.perf_counter()
    engine_config = engine_config_for(config)
    result["engine_config"] = {k: getattr(engine_config, k) for k in
                               engine_config.__dataclass_fields__}
    engine = Engine(engine_config)
    result["start_s"] = time.perf_counter() - t0
    print(f"engine alone: started in {result['start_s']:.1f}s", flush=True)
    try:
        def run(path: str, tag: str, max_tokens: int) -> dict[str, Any]:
            reqs = requests(path, tag)
            samples: list[tuple[int, int]] = []
            stop = threading.Event()

            def sample() -> None:
                while not stop.wait(SAMPLE_S):
                    s = engine.stats()
                    samples.append((int(s.get("running", 0)), int(s.get("waiting", 0))))

            sampler = threading.Thread(target=sample, daemon=True)
            sampler.start()
            t = time.perf_counter()
            futures = [engine.submit(r) for r in reqs]
            _, pending = wait_futures(futures, timeout=max(end - time.monotonic(), 30.0))
            seconds = time.perf_counter() - t
            stop.set()
            sampler.join()
            if pending:
                raise TimeoutError(f"{len(pending)} of {len(futures)} requests unfinished")
            comps = [f.result() for f in futures]
            tokens = sum(c.completion_tokens for c in comps)
            return {"jobs": len(comps), "seconds": seconds, "output_tokens": tokens,
                    "tokens_per_s": tokens / seconds, "jobs_per_s": len(comps) / seconds,
                    "short_outputs": sum(c.completion_tokens != max_tokens for c in comps),
                    "engine_running_mean": statistics.fmean(r for r, _ in samples)
                    if samples else None,
                    "engine_running_max": max((r for r, _ in samples), default=None),
                    "engine_first_token_s": dist([c.first_token_s for c in comps]),
                    "engine_queued_s": dist([c.queued_s for c in comps])}

        last = 0.0
        warm_tps: list[float] = []
        for i, (path, max_tokens) in enumerate(spec["warmups"]):
            t = time.perf_counter()
            w = run(path, f"w{i}", max_tokens)
            result.setdefault("warmups", []).append(w)
            warm_tps.append(w["tokens_per_s"])
            last = time.perf_counter() - t
            print(f"engine alone: warm-up {i + 1}: {w['tokens_per_s']:,.1f} tokens/s"
                  f" ({last:.1f}s)", flush=True)
            if steady(warm_tps) or end - time.monotonic() < 60.0:
                break
        for i, (path, max_tokens) in enumerate(spec["runs"]):
            if i > 0 and end - time.monotonic() < last:
                result["cut_short"] = True
                break
            t = time.perf_counter()
            r = run(path, f"r{i}", max_tokens)
            last = time.perf_counter() - t
            result["runs"].append(r)
            save()
            print(f"engine alone: run {i + 1}: {r['tokens_per_s']:,.1f} tokens/s"
                  f" ({r['seconds']:.2f}s)", flush=True)
        result["stats"] = engine.stats()
        save()
    finally:
        engine.shutdown()
    return 0


def run_engine_alone(ctx: Context, config: Path, warmups: list[PromptFile],
                     runs: list[PromptFile], tag: str) -> dict[str, Any]:
    """The engine alone in a child process, its results read back."""
    out = ctx.workdir / f"{tag}-result.json"
    spec_path = ctx.workdir / f"{tag}-spec.json"
    budget = ctx.deadline.remaining()
    spec_path.write_text(json.dumps({
        "config": str(config), "out": str(out),
        "budget_s": budget if budget != float("inf") else 3600.0,
        "warmups": [[str(p.path), p.max_tokens] for p in warmups],
        "runs": [[str(p.path), p.max_tokens] for p in runs],
    }))
    proc = ctx.start(tag, [sys.executable, str(Path(__file__).resolve()),
                           "--engine-alone-child", str(spec_path)], ctx.child_env())
    while proc.alive():
        if ctx.deadline.expired():
            log(f"{tag}: time budget spent; stopping it")
            break
        time.sleep(0.5)
    proc.stop(INTERRUPTED_GRACE_S)
    result = json.loads(out.read_text()) if out.exists() else {}
    if not result.get("runs"):
        raise RuntimeError(f"{tag} exited with {proc.proc.returncode} and no run:\n"
                           f"{proc.tail()}")
    result["tokens_per_s"] = median_of(result["runs"], "tokens_per_s")
    return result


# --- W-system --------------------------------------------------------------------------------
def warm_files(ctx: Context, tag: str, scale: int = 1) -> list[PromptFile]:
    """The warm-up files, all of fresh texts (made up front: the engine alone needs them)."""
    s = ctx.sizes
    return [ctx.prompt_file(f"{tag}-warmup{k}", s.warmup_jobs * scale)
            for k in range(s.max_warmups)]


def system_prompts(ctx: Context, tag: str, scale: int = 1) -> tuple[list[PromptFile],
                                                                    list[PromptFile]]:
    """Warm-up files and one file per repetition: distinct texts (the worker's engine caches
    prefixes, so a repetition must not meet what an earlier one computed)."""
    s = ctx.sizes
    reps = [ctx.prompt_file(f"{tag}-rep{r}", s.jobs * scale) for r in range(s.reps)]
    return warm_files(ctx, tag, scale), reps


def run_system(ctx: Context) -> None:
    gpus = 1 if ctx.on_gpu else 0
    rec = ctx.record("system", "system", gpus, "tokens/s")
    warm, reps = system_prompts(ctx, "system")
    config = ctx.write_config("system")
    rec["settings"] = settings(ctx, config, warm=warm[0], reps=reps)
    details = rec["details"]
    ctx.save("system")

    # The engine alone first: the device is free, and the worker started after it finds the
    # compiled kernels in the cache the engine filled.
    try:
        ctx.check_budget("the engine alone")
        log("W-system: the engine alone")
        eng = run_engine_alone(ctx, config, warm, reps, "engine-alone")
        details["engine_alone"] = eng
        rec["peers"]["engine_alone"] = eng["tokens_per_s"]
        log(f"W-system: engine alone {eng['tokens_per_s']:,.1f} tokens/s")
    except PhaseSkipped as err:
        rec["skipped"]["engine_alone"] = str(err)
    except Interrupted:
        rec["skipped"]["engine_alone"] = "interrupted"
        raise
    except Exception as err:
        traceback.print_exc()
        rec["errors"]["engine_alone"] = f"{type(err).__name__}: {err}"[:3000]
    finally:
        ctx.save("system")

    try:
        ctx.check_budget("a worker")
        ctx.flush()
        log("W-system: one worker (celery -A tasks worker -Q high,low)")
        worker, ready_s = start_worker(ctx, config, "system-worker")
        details["worker_start_s"] = ready_s
        run_worker_batches(ctx, rec, "system", config, worker, warm, reps, gpus=1)
        ctx.shared_worker = (config, worker)
    except PhaseSkipped as err:
        rec["skipped"]["project"] = str(err)
    except Interrupted:
        rec["skipped"].setdefault("project", "interrupted")
        raise
    except Exception as err:
        traceback.print_exc()
        rec["errors"]["project"] = f"{type(err).__name__}: {err}"[:3000]
    finally:
        finish_system_record(rec)
        ctx.save("system")


def warm_up(ctx: Context, producer: Any, config: Path, files: list[PromptFile], key: str,
            sampler: Sampler | None) -> tuple[list[dict[str, Any]], float]:
    """Warm-up batches until steady; returns their summaries and the last one's seconds."""
    out: list[dict[str, Any]] = []
    last = 0.0
    for k, pf in enumerate(files):
        t = time.perf_counter()
        w = timed_batch(ctx, producer, config, pf, f"{ctx.run_id}-{key}-warmup{k}", sampler)
        last = time.perf_counter() - t
        out.append({x: w.get(x) for x in ("jobs", "seconds", "tokens_per_s", "jobs_per_s",
                                          "first_started_s", "short_outputs")})
        log(f"  warm-up {k + 1}: {w.get('tokens_per_s') or 0:,.1f} tokens/s ({last:.1f}s)")
        if steady([x["tokens_per_s"] or 0.0 for x in out]):
            break
        if ctx.deadline.remaining() < GPU_MIN_PHASE_S / 2:
            break
    return out, last


def run_worker_batches(ctx: Context, rec: dict[str, Any], key: str, config: Path,
                       proc: Managed, warm: list[PromptFile], reps: list[PromptFile],
                       gpus: int) -> None:
    """Warm-up batches, then the timed batches, each through `producer submit`; the figures
    go into rec (saved after every batch)."""
    from producer import Producer
    from tasks.config import load_config

    details = rec["details"]
    sampler = Sampler(metrics_ports(config, gpus), ctx.client).start()
    try:
        with Producer(load_config(config)) as producer:
            details["warmups"], last = warm_up(ctx, producer, config, warm, key, sampler)
            runs = details.setdefault("runs", [])
            for i, pf in enumerate(reps):
                if i > 0 and ctx.deadline.remaining() < last:
                    rec["settings"]["cut_short"] = True
                    log(f"  time budget left ({ctx.deadline.remaining():.0f}s) < one run;"
                        f" stopping after {i} run(s)")
                    break
                t = time.perf_counter()
                r = timed_batch(ctx, producer, config, pf, f"{ctx.run_id}-{key}-rep{i}", sampler)
                last = time.perf_counter() - t
                runs.append(r)
                rec["project"] = median_of(runs, "tokens_per_s")
                ctx.save(key)
                log(f"  run {i + 1}/{len(reps)}: {r['tokens_per_s']:,.1f} tokens/s, "
                    f"{r['jobs_per_s']:,.1f} jobs/s, first job started after "
                    f"{r['first_started_s']:.2f}s, engine running mean "
                    f"{r.get('samples', {}).get('engine_running_mean', float('nan')):.0f}"
                    f" ({last:.1f}s; submit CLI {r['cli_s']:.2f}s)")
    finally:
        sampler.stop()
        if not proc.alive():
            details["worker_log_tail"] = proc.tail()


def finish_system_record(rec: dict[str, Any]) -> None:
    details = rec["details"]
    runs = details.get("runs", [])
    rec["project"] = median_of(runs, "tokens_per_s")
    rec["jobs_per_s"] = median_of(runs, "jobs_per_s")
    eng = rec["peers"].get("engine_alone")
    if rec["project"] is not None and eng:
        rec["ratios"]["vs_engine_alone"] = rec["project"] / eng
    # Where the time goes, medians over the timed runs: what to look at first when profiling.
    samples = [r.get("samples", {}) for r in runs]
    eng_runs = details.get("engine_alone", {}).get("runs", [])
    rec["diagnostics"] = {
        "worker_start_s": details.get("worker_start_s"),
        "engine_alone_start_s": details.get("engine_alone", {}).get("start_s"),
        "submit_cli_s": median_of(runs, "cli_s"),
        "first_job_started_s": median_of(runs, "first_started_s"),
        "first_job_finished_s": median_of(runs, "first_finished_s"),
        "tokens_per_s_from_first_start": median_of(runs, "tokens_per_s_from_first_start"),
        "steady_tokens_per_s": median_of(runs, "steady_tokens_per_s"),
        "engine_running_mean": median_of(samples, "engine_running_mean"),
        "jobs_running_mean": median_of(samples, "jobs_running_mean"),
        "engine_alone_running_mean": median_of(eng_runs, "engine_running_mean"),
        "engine_alone_jobs_per_s": median_of(eng_runs, "jobs_per_s"),
    }


# --- reliability -----------------------------------------------------------------------------
def run_reliability(ctx: Context) -> None:
    from producer import Producer
    from tasks import keys
    from tasks.config import load_config

    s = ctx.sizes
    gpus = 1 if ctx.on_gpu else 0
    rec = ctx.record("reliability", "reliability", gpus, "tokens/s")
    pf = ctx.prompt_file("reliability", s.reliability_jobs, max_tokens=s.reliability_tokens)
    details = rec["details"]
    try:
        if ctx.shared_worker is not None and ctx.shared_worker[1].alive():
            config, worker = ctx.shared_worker
            details["worker"] = "the W-system worker, still running"
        else:
            ctx.check_budget("a worker")
            config = ctx.write_config("reliability")
            ctx.flush()
            worker, details["worker_start_s"] = start_worker(ctx, config, "reliability-worker")
            ctx.shared_worker = (config, worker)
            details["worker"] = "started for this run"
        rec["settings"] = settings(ctx, config, jobs=pf, kill_worker=ctx.args.kill_worker)
        ctx.save("reliability")
        batch = f"{ctx.run_id}-reliability"
        with Producer(load_config(config)) as producer:
            log(f"reliability: {pf.jobs} jobs through one worker"
                + (" (kill -9 mid-run)" if ctx.args.kill_worker else ""))
            sub = cli_submit(ctx, config, pf, batch)
            t_submit = sub["submit_start"]
            details.update(cli_s=sub["cli_s"], cli_report=sub["cli_report"])
            kill: dict[str, Any] | None = None
            if ctx.args.kill_worker:
                kill = kill_and_restart(ctx, producer, batch, pf.jobs, config, worker)
                details["kill"] = kill
                ctx.save("reliability")
            status = wait_batch(ctx, producer, batch, timeout=ctx.args.reliability_timeout)
            records = list(producer.store.iter_jobs(batch))
            counts = producer.store.batch_counts(batch)
            summary = summarize_jobs(records, t_submit, pf.max_tokens)
            details["batch"] = summary
            if kill is not None and kill.get("killed_jobs"):
                kill.update(recovery(records, kill))
            checks, stuck = reliability_checks(ctx, records, counts, status, kill, keys)
            rec.update(jobs=pf.jobs, counts=dict(Counter(r.state for r in records)),
                       checks=checks, ok=all(checks.values()), stuck=stuck)
            rec["project"] = summary.get("tokens_per_s")
            rec["jobs_per_s"] = summary.get("jobs_per_s")
            done = rec["counts"].get("done", 0)
            rec["ratios"]["done_fraction"] = done / pf.jobs
            if kill is not None and kill.get("recovery_s") is not None:
                rec["recovery_s"] = kill["recovery_s"]
            failed = [k for k, v in checks.items() if not v]
            ctx.failed_checks += [f"reliability: {k}" for k in failed]
            log(f"reliability: {rec['counts']}; checks "
                + ("all passed" if not failed else f"FAILED {failed}")
                + (f"; {rec['project']:,.1f} tokens/s" if rec["project"] else ""))
    except PhaseSkipped as err:
        rec["skipped"]["project"] = str(err)
    except Interrupted:
        rec["skipped"].setdefault("project", "interrupted")
        raise
    except Exception as err:
        traceback.print_exc()
        rec["errors"]["project"] = f"{type(err).__name__}: {err}"[:3000]
        ctx.failed_checks.append(f"reliability: {type(err).__name__}")
    finally:
        ctx.save("reliability")


def kill_and_restart(ctx: Context, producer: Any, batch: str, total: int, config: Path,
                     worker: Managed) -> dict[str, Any]:
    """kill -9 the worker once kill_at of the jobs are done, note which jobs it was running,
    start a new worker the same way."""
    want = max(1, int(total * ctx.sizes.kill_at))
    status = wait_batch(ctx, producer, batch, timeout=ctx.args.reliability_timeout,
                        until=lambda st: st.count("done") >= want, poll=0.05)
    if status.finished:
        return {"note": "the batch finished before the kill point", "killed_jobs": 0}
    kill_time = time.time()
    worker.kill9()
    log(f"  killed the worker (-9) with {status.count('done')}/{total} done")
    running = [r.job_id for r in producer.store.iter_jobs(batch) if r.state == "running"]
    new, ready_s = start_worker(ctx, config, "reliability-worker-2")
    ctx.shared_worker = (config, new)
    return {"kill_time": kill_time, "done_at_kill": status.count("done"),
            "killed_jobs": len(running), "killed_ids": running,
            "new_worker_ready_s": ready_s}


def recovery(records: list[Any], kill: dict[str, Any]) -> dict[str, Any]:
    """From the job records: when every job the dead worker held was running again."""
    killed = set(kill.pop("killed_ids", []))
    t_kill = kill["kill_time"]
    restarts, deliveries, not_rerun = [], [], []
    for r in records:
        if r.job_id not in killed:
            continue
        st = ffloat(r.fields, "started_at")
        deliveries.append(int(r.fields.get("deliveries", 0) or 0))
        if st is not None and st > t_kill:
            restarts.append(st - t_kill)
        else:
            not_rerun.append(r.job_id)
    return {"recovery_s": max(restarts) if restarts and not not_rerun else None,
            "rerun_after_s": dist(restarts), "killed_not_rerun": not_rerun[:20],
            "killed_with_deliveries": sum(d > 0 for d in deliveries)}


def reliability_checks(ctx: Context, records: list[Any], counts: dict[str, int], status: Any,
                       kill: dict[str, Any] | None, keys: Any) -> tuple[dict[str, bool],
                                                                        dict[str, Any]]:
    states = Counter(r.state for r in records)
    total = counts.get("total", 0)
    by_state = Counter()
    for name, value in counts.items():
        priority, sep, state = name.partition(":")
        if sep and state in keys.STATES:
            by_state[state] += value
    record_tokens = sum(int((r.result or {}).get("completion_tokens", 0)) for r in records
                        if r.state == "done")
    ids = {r.job_id for r in records}
    leases_left = [m.decode() for m in ctx.client.zrange(keys.LEASES_KEY, 0, -1)
                   if m.decode() in ids]
    pending_left = [m.decode() for q in keys.QUEUES
                    for m in ctx.client.zrange(keys.pending_key(q), 0, -1) if m.decode() in ids]
    stuck = {
        "not_finished": [r.job_id for r in records if r.state in ("queued", "running")][:20],
        "leases_left": leases_left[:20], "pending_left": pending_left[:20],
        "queue_lengths": {q: int(ctx.client.llen(q)) for q in keys.QUEUES},
    }
    checks = {
        "all_jobs_recorded": len(records) == total == ctx.sizes.reliability_jobs,
        "all_done": states.get("done", 0) == total,
        "none_lost": sum(states.get(s, 0) for s in keys.TERMINAL_STATES) == total,
        "none_stuck": not stuck["not_finished"] and not leases_left and not pending_left,
        # A job finished twice would count twice: the counters must add up to the total and
        # agree with the records.
        "counters_sum_to_total": sum(by_state.values()) == total,
        "counters_match_records": all(by_state.get(s, 0) == states.get(s, 0)
                                      for s in keys.STATES),
        "completion_tokens_match": counts.get("completion_tokens", -1) == record_tokens,
        "full_outputs": all(int((r.result or {}).get("completion_tokens", -1))
                            == ctx.sizes.reliability_tokens
                            for r in records if r.state == "done"),
    }
    if kill is not None and kill.get("killed_jobs"):
        checks["killed_jobs_ran_again"] = not kill.get("killed_not_rerun")
    return checks, stuck


# --- W-scale ---------------------------------------------------------------------------------
def scale_points(gpus_list: list[int], per_worker_list: list[int]) -> list[tuple[int, int]]:
    """W-scale's (GPUs, GPUs per worker) runs, in order: every N with one GPU a worker first,
    then the sharded groups (--gpus-per-worker) wherever N holds a whole number of them."""
    return [(n, g) for g in sorted(set(per_worker_list)) for n in sorted(set(gpus_list))
            if n % g == 0]


def scale_key(n: int, per_worker: int) -> tuple[str, str]:
    """W-scale's record key and file suffix: `scale4` / `4gpu` as always for one GPU a worker,
    `scale8-tp2` / `8gpu-tp2` for workers of two GPUs each (tensor-sharded)."""
    if per_worker == 1:
        return f"scale{n}", f"{n}gpu"
    return f"scale{n}-tp{per_worker}", f"{n}gpu-tp{per_worker}"


def run_scale(ctx: Context) -> None:
    figures: dict[tuple[int, int], float] = {}
    one_gpu_source = "launcher, N=1, this run"
    for n, per_worker in scale_points(ctx.args.gpus_list, ctx.args.gpus_per_worker):
        key, suffix = scale_key(n, per_worker)
        rec = ctx.record(key, "scale", n, "tokens/s", suffix=suffix,
                         gpus_per_worker=per_worker, workers=n // per_worker)
        try:
            if not ctx.on_gpu:
                raise NotOnThisMachine("W-scale needs GPUs (a CPU deployment runs one worker)")
            if n > ctx.device_count:
                raise NotOnThisMachine(f"{n} GPUs asked, {ctx.device_count} present")
            ctx.check_budget(f"W-scale N={n}")
            # The same files for every deployment on N GPUs: each starts with empty caches.
            warm, reps = system_prompts(ctx, f"scale{n}", scale=n)
            # One GPU a worker, or sharded model groups with the model split over their GPUs.
            overrides = {"gpus_per_worker": per_worker,
                         "model_shard_strategy": "tensor" if per_worker > 1 else "none"}
            config = ctx.write_config(key, overrides, workers=n)
            rec["settings"] = settings(ctx, config, warm=warm[0], reps=reps, num_gpus=n)
            ctx.flush()
            log(f"W-scale N={n}, {per_worker} GPU(s) a worker: python -m tasks.launch"
                f" --num_gpus {n}")
            proc, ready_s = start_launcher(ctx, config, n, f"{key}-launcher")
            rec["details"]["workers_start_s"] = ready_s
            try:
                run_worker_batches(ctx, rec, key, config, proc, warm, reps, gpus=n)
            finally:
                proc.stop()
                ctx.flush()
            rec["project"] = median_of(rec["details"]["runs"], "tokens_per_s")
            if rec["project"] is not None:
                figures[(n, per_worker)] = rec["project"]
        except NotOnThisMachine as err:
            del ctx.records[key]
            log(f"W-scale N={n}: not run ({err}); no file written")
            continue
        except PhaseSkipped as err:
            rec["skipped"]["project"] = str(err)
            log(f"W-scale N={n}: skipped ({err})")
        except Interrupted:
            rec["skipped"].setdefault("project", "interrupted")
            raise
        except Exception as err:
            traceback.print_exc()
            rec["errors"]["project"] = f"{type(err).__name__}: {err}"[:3000]
        finally:
            one = figures.get((1, 1))
            if one is None and "system" in ctx.records:
                one = ctx.records["system"][0].get("project")
                one_gpu_source = "W-system (one worker started by hand), this run"
            if key in ctx.records:
                if one and rec["project"] is not None:
                    rec["peers"]["one_gpu"] = one
                    rec["ratios"]["vs_n_times_1gpu"] = rec["project"] / (n * one)
                    rec["one_gpu_source"] = one_gpu_source
                single = figures.get((n, 1))
                if per_worker > 1 and single and rec["project"] is not None:
                    # The same N GPUs as one-GPU workers, earlier in this run.
                    rec["peers"]["single_gpu_workers"] = single
                    rec["ratios"]["vs_single_gpu_workers"] = rec["project"] / single
                ctx.save(key)


# --- W-priority ------------------------------------------------------------------------------
def high_files(ctx: Context, tag: str) -> list[Path]:
    """One single-line JSONL file per high job (each submitted on its own)."""
    s = ctx.sizes
    pf = ctx.prompt_file(tag, s.high_jobs, lengths=(s.high_prompt_tokens, s.high_prompt_tokens))
    out = []
    for i, line in enumerate(pf.path.read_text().splitlines()):
        path = ctx.workdir / f"{tag}-{i:02d}.jsonl"
        path.write_text(line + "\n")
        out.append(path)
    return out


def high_series(ctx: Context, producer: Any, files: list[Path], tag: str) -> dict[str, Any]:
    """Submit each file as its own high batch, one every high_interval_s, then wait for all;
    latency = the worker's finished_at minus the wall-clock time just before submit."""
    from tasks import keys

    s = ctx.sizes
    jobs: list[tuple[str, float, float]] = []
    t_next = time.monotonic()
    for i, path in enumerate(files):
        pause = t_next - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        t_sub = time.time()
        report = producer.submit(path, priority=keys.QUEUE_HIGH,
                                 batch_id=f"{ctx.run_id}-{tag}-{i:02d}")
        jobs.append((keys.job_id_for(report.batch_id, None, 1), t_sub, time.time() - t_sub))
        t_next += s.high_interval_s
    end = time.monotonic() + ctx.wait_left(300.0)
    while True:
        pipe = ctx.client.pipeline(transaction=False)
        for job_id, _, _ in jobs:
            pipe.hget(keys.job_key(job_id), "state")
        states = [(v or b"").decode() for v in pipe.execute()]
        if all(st in keys.TERMINAL_STATES for st in states) or time.monotonic() > end:
            break
        time.sleep(0.05)
    latencies, waits, submit_s, short = [], [], [], 0
    after_engine: list[float] = []  # engine future resolved -> outcome stored
    unfinished = 0
    last_finish = 0.0
    for job_id, t_sub, sub_s in jobs:
        rec = producer.store.job(job_id)
        fin = ffloat(rec.fields, "finished_at") if rec else None
        submit_s.append(sub_s)
        if rec is None or rec.state != "done" or fin is None:
            unfinished += 1
            continue
        latencies.append(fin - t_sub)
        st = ffloat(rec.fields, "started_at")
        if st is not None:
            waits.append(st - t_sub)
            engine_s = (rec.result or {}).get("total_s")
            if isinstance(engine_s, int | float):
                after_engine.append(fin - st - engine_s)
        short += int((rec.result or {}).get("completion_tokens", 0)) != s.max_tokens
        last_finish = max(last_finish, fin)
    return {"jobs": len(jobs), "unfinished": unfinished, "short_outputs": short,
            "latency_s": dist(latencies), "queue_wait_s": dist(waits),
            "after_engine_s": dist(after_engine),
            "submit_call_s": dist(submit_s), "latencies": [round(x, 4) for x in latencies],
            # per job, in submission order (jobs that did not finish left out): what p99 is
            # made of, next to the engine's step trace
            "queue_waits": [round(x, 4) for x in waits],
            "after_engine": [round(x, 4) for x in after_engine],
            "window": [jobs[0][1], last_finish or time.time()]}


def low_in_window(producer: Any, batches: list[str], t0: float, t1: float) -> dict[str, Any]:
    """Low jobs finished (done) inside [t0, t1] and the tokens they produced."""
    jobs = tokens = 0
    for batch in batches:
        for r in producer.store.iter_jobs(batch):
            fin = ffloat(r.fields, "finished_at")
            if r.state == "done" and fin is not None and t0 <= fin <= t1:
                jobs += 1
                tokens += int((r.result or {}).get("completion_tokens", 0))
    span = t1 - t0
    return {"jobs": jobs, "output_tokens": tokens, "seconds": span,
            "tokens_per_s": tokens / span if span > 0 else None,
            "jobs_per_s": jobs / span if span > 0 else None}


def high_only_workers_for(strategy: str, asked: int | None, config_data: dict[str, Any]) -> int:
    """W-priority's high-only workers for one strategy: none with `even` (the config refuses
    them there); with `priority`, --high-only-workers when given, else the config's own, so
    that a deployment such as configs/gpu-4x-priority.yaml runs as shipped."""
    if strategy != "priority":
        return 0
    if asked is not None:
        return asked
    return int(config_data.get("high_only_workers", 0))


def strategy_list(text: str) -> tuple[str, ...]:
    """--strategies: "priority,even" -> ("priority", "even"), each a known strategy, in the
    order given."""
    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"{text!r}: strategies are {', '.join(STRATEGIES)}, comma-separated")
    return names


def run_priority(ctx: Context) -> None:
    from producer import Producer
    from tasks.config import load_config

    s = ctx.sizes
    n = ctx.args.priority_gpus
    low_tps: dict[str, float] = {}
    for strategy in ctx.args.strategies:
        key = f"priority-{strategy}"
        rec = ctx.record(key, "priority", n, "s", suffix=strategy, strategy=strategy)
        details = rec["details"]
        flood_batches: list[str] = []
        try:
            if not ctx.on_gpu:
                raise NotOnThisMachine("W-priority needs GPUs")
            if n > ctx.device_count:
                raise NotOnThisMachine(f"{n} GPUs asked, {ctx.device_count} present")
            ctx.check_budget(f"W-priority ({strategy})")
            high_only = high_only_workers_for(strategy, ctx.args.high_only_workers,
                                              ctx.config_data)
            config = ctx.write_config(key, {"gpu_allocation_strategy": strategy,
                                            "high_only_workers": high_only}, workers=n)
            warm = warm_files(ctx, key, n)
            flood = ctx.prompt_file(f"{key}-flood", s.flood_jobs * n)
            # Made now: making prompts during the flood's lead took 8-15 s, in which the
            # workers drained the queue below what the window needs.
            reserve = ctx.prompt_file(f"{key}-flood-reserve", FLOOD_RESERVE * s.flood_jobs * n)
            idle_files = high_files(ctx, f"{key}-high-idle")
            flood_files = high_files(ctx, f"{key}-high-flood")
            rec["settings"] = settings(ctx, config, warm=warm[0], flood=flood, num_gpus=n,
                                       high_jobs=s.high_jobs, high_interval_s=s.high_interval_s,
                                       high_prompt_tokens=s.high_prompt_tokens,
                                       high_only_workers=high_only)
            ctx.flush()
            log(f"W-priority ({strategy}): python -m tasks.launch --num_gpus {n}")
            proc, ready_s = start_launcher(ctx, config, n, f"{key}-launcher")
            details["workers_start_s"] = ready_s
            try:
                with Producer(load_config(config)) as producer:
                    details["warmups"], _ = warm_up(ctx, producer, config, warm, key, None)
                    idle = high_series(ctx, producer, idle_files, f"{key}-idle")
                    details["idle"] = idle
                    log(f"  idle: high p50 {idle['latency_s'].get('p50') or 0:.3f}s, p99 "
                        f"{idle['latency_s'].get('p99') or 0:.3f}s")
                    ctx.check_budget("the flood", 20.0)
                    details["flood"] = flood_phase(ctx, producer, key, flood, reserve,
                                                   flood_batches, idle)
                    under = high_series(ctx, producer, flood_files, f"{key}-flood")
                    details["under_flood"] = under
                    t0, t1 = under["window"]
                    left = sum(producer.status(b).count("queued") for b in flood_batches)
                    low = low_in_window(producer, flood_batches, t0, t1)
                    details["low_in_window"] = low
                    details["flood"]["low_queued_at_window_end"] = left
                    # Flood at window start >= done in the window + left at its end.
                    details["flood"]["at_least_twice"] = left >= low["jobs"]
                    for b in flood_batches:
                        producer.cancel(b)
            finally:
                proc.stop()
                ctx.flush()
            lat, base = under["latency_s"], idle["latency_s"]
            rec["project"] = lat.get("p99")
            rec["high_p50_s"] = lat.get("p50")
            rec["peers"] = {"idle_p99": base.get("p99"), "idle_p50": base.get("p50")}
            if lat.get("p99") and base.get("p99"):
                rec["ratios"]["high_p99_vs_idle"] = lat["p99"] / base["p99"]
            if lat.get("p50") and base.get("p50"):
                rec["ratios"]["high_p50_vs_idle"] = lat["p50"] / base["p50"]
            rec["low_tokens_per_s"] = low["tokens_per_s"]
            rec["low_jobs_per_s"] = low["jobs_per_s"]
            if low["tokens_per_s"]:
                low_tps[strategy] = low["tokens_per_s"]
            log(f"  under flood: high p50 {lat.get('p50') or 0:.3f}s, p99 "
                f"{lat.get('p99') or 0:.3f}s; low {low['tokens_per_s'] or 0:,.1f} tokens/s"
                f" in the window; flood at least twice: {details['flood']['at_least_twice']}")
        except NotOnThisMachine as err:
            del ctx.records[key]
            log(f"W-priority ({strategy}): not run ({err}); no file written")
            continue
        except PhaseSkipped as err:
            rec["skipped"]["project"] = str(err)
            log(f"W-priority ({strategy}): skipped ({err})")
        except Interrupted:
            rec["skipped"].setdefault("project", "interrupted")
            raise
        except Exception as err:
            traceback.print_exc()
            rec["errors"]["project"] = f"{type(err).__name__}: {err}"[:3000]
        finally:
            if "priority" in low_tps and "even" in low_tps:
                prio, _ = ctx.records["priority-priority"]
                prio["ratios"]["low_throughput_vs_even"] = low_tps["priority"] / low_tps["even"]
                prio["peers"]["even_low_tokens_per_s"] = low_tps["even"]
                ctx.save("priority-priority")
            if key in ctx.records:
                ctx.save(key)


def flood_phase(ctx: Context, producer: Any, key: str, flood: PromptFile, reserve: PromptFile,
                batches: list[str], idle: dict[str, Any]) -> dict[str, Any]:
    """Submit the low flood, let it run flood_lead_s, then make sure what is queued is at
    least twice what the workers will finish in the high window (topping up once, from the
    `reserve` prompts made beforehand)."""
    from tasks import keys

    s = ctx.sizes
    first = f"{ctx.run_id}-{key}-flood"
    producer.submit(flood.path, priority=keys.QUEUE_LOW, batch_id=first)
    batches.append(first)
    t0 = time.monotonic()
    time.sleep(s.flood_lead_s / 2)
    d0, t_mid = producer.status(first).count("done"), time.monotonic()
    time.sleep(s.flood_lead_s / 2)
    st = producer.status(first)
    rate = (st.count("done") - d0) / max(time.monotonic() - t_mid, 1e-6)
    window = s.high_jobs * s.high_interval_s + max(2.0 * (idle["latency_s"].get("p99") or 1.0),
                                                   1.0)
    need = 2.0 * rate * window
    out = {"jobs": flood.jobs, "lead_s": time.monotonic() - t0, "low_jobs_per_s_lead": rate,
           "window_estimate_s": window, "queued_needed": need, "topped_up": 0}
    if st.count("queued") < need:
        # What is missing and a margin of a tenth of the flood, cut from the reserve (a copy
        # of its first lines takes milliseconds).
        wanted = int(need - st.count("queued")) + flood.jobs // 10 + 1
        taken = min(wanted, reserve.jobs)
        extra = reserve.path.with_name(f"{key}-flood-extra.jsonl")
        with reserve.path.open(encoding="utf-8") as src, extra.open("w", encoding="utf-8") as f:
            f.writelines(line for _, line in zip(range(taken), src, strict=False))
        batch = f"{first}-extra"
        producer.submit(extra, priority=keys.QUEUE_LOW, batch_id=batch)
        batches.append(batch)
        out["topped_up"] = taken
        out["reserve_too_small"] = wanted > reserve.jobs
    out["queued_at_start"] = sum(producer.status(b).count("queued") for b in batches)
    return out


# --- the run ---------------------------------------------------------------------------------
def settings(ctx: Context, config: Path, **extra: Any) -> dict[str, Any]:
    from tasks.worker import gil_switch_interval

    out: dict[str, Any] = {
        "config_source": str(ctx.args.config), "config": yaml.safe_load(config.read_text()),
        "eos": "checkpoint copy without EOS ids (the JSONL format has no ignore_eos); every"
               " job is checked to return max_tokens tokens (short_outputs)",
        "greedy": True, "time_budget_s": ctx.args.time_budget, "seed": ctx.args.seed,
        "quick": ctx.args.quick,
        # The workers' GIL switch interval (they inherit this environment): the default
        # unless $TIDEQ_GIL_SWITCH_MS overrides it for a comparison.
        "gil_switch_ms": gil_switch_interval() * 1000,
    }
    for k, v in extra.items():
        out[k] = v.stats() if isinstance(v, PromptFile) else (
            [p.stats() for p in v] if isinstance(v, list) and v and isinstance(v[0], PromptFile)
            else v)
    return out


def probe_cuda() -> tuple[int, str | None]:
    """Visible GPUs and the first one's name, asked in a child process so that this process
    never creates a CUDA context (it would hold memory on GPU 0 for the whole run)."""
    code = ("import torch\nn = torch.cuda.device_count() if torch.cuda.is_available() else 0\n"
            "print(n)\nprint(torch.cuda.get_device_name(0) if n else '')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        return 0, None
    lines = proc.stdout.strip().splitlines()
    return int(lines[0]), (lines[1] if len(lines) > 1 and lines[1] else None)


def prepare_checkpoint(args: argparse.Namespace, config_data: dict[str, Any],
                       on_gpu: bool) -> tuple[str, Path]:
    """The model (built like bench_engine.py does, in a child process) and its EOS-free view."""
    model_cfg = config_data.get("model") or {}
    if args.model == "config":
        source = Path(model_cfg.get("path", ".tideq/models/tiny-llama"))
        if not source.is_absolute():
            source = REPO_ROOT / source
        name = source.name
    else:
        name = args.model
        source = args.model_dir / f"llama-{args.model}"
        complete = (source / "config.json").exists() and any(source.glob("*.safetensors"))
        if not complete:
            dtype = model_cfg.get("dtype", "bfloat16")
            dtype = "bfloat16" if dtype == "int8" else dtype
            t0 = time.perf_counter()
            subprocess.run([sys.executable, "-m", "engine.random_checkpoint", str(source),
                            "--shape", args.model, "--dtype", dtype, "--device",
                            "cuda" if on_gpu else "cpu"], cwd=REPO_ROOT, check=True,
                           timeout=900)
            log(f"checkpoint {args.model}: built in {time.perf_counter() - t0:.1f}s")
    return name, no_eos_view(source, args.model_dir / f"{source.name}-noeos")


def no_eos_view(source: Path, view: Path) -> Path:
    """A folder of links to `source`'s files, but whose config.json and generation_config.json
    name no EOS token: the engine then decodes every job to max_tokens."""
    if view.exists():
        for p in view.iterdir():
            p.unlink()
    view.mkdir(parents=True, exist_ok=True)
    for p in source.iterdir():
        if p.name in ("config.json", "generation_config.json"):
            data = json.loads(p.read_text())
            data.pop("eos_token_id", None)
            if p.name == "config.json":
                data["eos_token_id"] = None
            (view / p.name).write_text(json.dumps(data, indent=2))
        else:
            (view / p.name).symlink_to(p.resolve())
    return view


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="system",
                   help="comma list of system, scale, priority, reliability, or all"
                        " (default system)")
    p.add_argument("--config", type=Path, default=DEFAULT_CONFIG,
                   help="the deployment config (default configs/gpu-1x.yaml); each phase runs"
                        " a copy with the model path, Redis URL and metrics port of this run")
    p.add_argument("--model", default="1b", choices=MODELS,
                   help="random checkpoint to build and serve (config: the config's own"
                        " model.path)")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/tideq-bench-models"))
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR, help="JSON directory")
    p.add_argument("--redis-url", default=None,
                   help="Redis to use (default redis://127.0.0.1:6379/<--redis-db>); the bench"
                        " flushes its database")
    p.add_argument("--redis-db", type=int, default=0)
    p.add_argument("--flush-redis", action="store_true",
                   help="on a machine without CUDA: flush the database even if not empty")
    p.add_argument("--gpus-list", default="1,2", help="W-scale: GPU counts (default 1,2)")
    p.add_argument("--gpus-per-worker", default="1",
                   help="W-scale: GPUs a worker, comma list (default 1); 2 adds, at every N"
                        " it divides, workers of two tensor-sharded GPUs, compared with the"
                        " one-GPU workers on the same N")
    p.add_argument("--priority-gpus", type=int, default=1,
                   help="W-priority: GPUs of the deployment (default 1)")
    p.add_argument("--strategies", type=strategy_list, default=STRATEGIES,
                   help="W-priority: gpu_allocation_strategy values to run, comma-separated"
                   " (default priority,even; low_throughput_vs_even needs both)")
    p.add_argument("--high-only-workers", type=int, default=None,
                   help="W-priority, strategy priority: workers that serve only high"
                        " (default: the config's high_only_workers, so a deployment runs as"
                        " shipped)")
    p.add_argument("--kill-worker", action="store_true",
                   help="reliability: kill -9 the worker mid-run and start a new one")
    p.add_argument("--reliability-timeout", type=float, default=600.0)
    p.add_argument("--no-metrics", dest="metrics", action="store_false",
                   help="do not set metrics_port (no engine samples)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    p.add_argument("--jobs", type=int, help="W-system jobs per run (2048)")
    p.add_argument("--max-tokens", type=int, help="output tokens per job (128)")
    p.add_argument("--prompt-min", type=int, help="shortest prompt in tokens (40)")
    p.add_argument("--prompt-max", type=int, help="longest prompt in tokens (470)")
    p.add_argument("--warmup-jobs", type=int, help="jobs of each warm-up batch (512)")
    p.add_argument("--max-warmups", type=int, help="warm-up batches at most (6; until steady)")
    p.add_argument("--reps", type=int, help="timed runs of W-system / W-scale (3)")
    p.add_argument("--reliability-jobs", type=int, help="reliability jobs (4096)")
    p.add_argument("--reliability-tokens", type=int, help="reliability output tokens (128)")
    p.add_argument("--flood-jobs", type=int, help="W-priority low flood per worker (4096)")
    p.add_argument("--high-jobs", type=int, help="W-priority high jobs (50)")
    p.add_argument("--seed", type=int, default=0, help="seed of the prompt texts")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help=f"seconds for the whole run (default {GPU_TIME_BUDGET_S:.0f} on a GPU,"
                        " none on CPU; 0: none)")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep configs, prompt files and process logs here (default: a"
                        " temporary folder, removed at the end)")
    p.add_argument("--commit", default=None, help="commit to record (default: git / $TIDEQ_COMMIT)")
    p.add_argument("--engine-alone-child", type=Path, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.engine_alone_child is not None:
        return args
    names = [w.strip() for w in args.workload.split(",") if w.strip()]
    if names == ["all"]:
        names = list(WORKLOADS)
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        p.error(f"unknown workload(s) {bad}; choose from {list(WORKLOADS)} or all")
    args.workloads = list(dict.fromkeys(names))  # in the order given
    args.gpus_list = sorted({int(x) for x in args.gpus_list.split(",") if x.strip()})
    args.gpus_per_worker = sorted({int(x) for x in args.gpus_per_worker.split(",") if x.strip()})
    if not args.gpus_per_worker or min(args.gpus_per_worker) < 1:
        p.error("--gpus-per-worker: a comma list of GPU counts >= 1")
    base = QUICK if args.quick else Sizes()
    overrides = {k: getattr(args, k) for k in ("jobs", "max_tokens", "prompt_min", "prompt_max",
                                               "warmup_jobs", "max_warmups", "reps",
                                               "reliability_jobs",
                                               "reliability_tokens", "flood_jobs", "high_jobs")
                 if getattr(args, k) is not None}
    if "max_tokens" in overrides and "reliability_tokens" not in overrides:
        overrides["reliability_tokens"] = overrides["max_tokens"]
    fields = {f: getattr(base, f) for f in Sizes.__dataclass_fields__} | overrides
    args.sizes = Sizes(**fields)
    return args


def check_limits(sizes: Sizes, config_data: dict[str, Any]) -> None:
    from tasks.config import parse_config

    cfg = parse_config(config_data)
    longest = max(sizes.prompt_max, sizes.high_prompt_tokens)
    tokens = max(sizes.max_tokens, sizes.reliability_tokens)
    if longest > cfg.limits.max_prompt_tokens or longest + tokens > cfg.model.max_model_len:
        raise SystemExit(f"prompts of up to {longest} tokens + {tokens} output tokens do not fit"
                         f" the config (limits.max_prompt_tokens {cfg.limits.max_prompt_tokens},"
                         f" model.max_model_len {cfg.model.max_model_len})")
    if tokens > cfg.limits.max_output_tokens:
        raise SystemExit(f"{tokens} output tokens exceed limits.max_output_tokens"
                         f" ({cfg.limits.max_output_tokens})")


def compile_bytecode() -> float:
    """Byte-compile every package on the import path, as `pip install` does at install time;
    returns the seconds it took. A Python that may not write bytecode
    (PYTHONDONTWRITEBYTECODE, as set on the GPU machine, whose packages are installed with
    --no-compile) otherwise compiles redis, pydantic and the rest from source in every process
    it starts: `producer submit` took 0.78 s there against 0.40 s compiled, all of it before its
    first job, and W-system and W-scale would time that instead of the product."""
    t0 = time.perf_counter()
    roots = [p for p in sys.path if p and Path(p).is_dir() and Path(p).resolve() != REPO_ROOT]
    roots += [str(REPO_ROOT / pkg) for pkg in ("producer", "tasks", "engine")]
    subprocess.run([sys.executable, "-m", "compileall", "-q", "-j", "0", *roots],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.engine_alone_child is not None:
        return engine_alone_child(args.engine_alone_child)
    log(f"byte-compiled the import path in {compile_bytecode():.1f}s (as pip does at install)")

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    config_data = yaml.safe_load(args.config.read_text()) or {}
    on_gpu = int(config_data.get("num_gpus", 0) or 0) > 0
    device_count, gpu_name = probe_cuda() if on_gpu else (0, None)
    if on_gpu and device_count == 0:
        raise SystemExit(f"{args.config} asks for GPUs but torch sees none (use a config with"
                         " num_gpus: 0 on a CPU)")
    if args.time_budget is None and on_gpu:
        args.time_budget = GPU_TIME_BUDGET_S
    deadline = Deadline(args.time_budget)
    url = args.redis_url or f"redis://127.0.0.1:6379/{args.redis_db}"
    client = redis.Redis.from_url(url)
    client.ping()
    if not on_gpu and client.dbsize() and not args.flush_redis:
        raise SystemExit(f"{url} is not empty and the bench flushes it: pick an empty database"
                         " (--redis-db / --redis-url) or pass --flush-redis")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tideq-bench-system-"))
    workdir.mkdir(parents=True, exist_ok=True)
    card = gpu_name if on_gpu and gpu_name else card_name("cpu")
    base = {"card": card, "date": today(), "commit": git_commit(args.commit),
            "run_id": None, **versions()}
    log(f"card {card}; {device_count} GPU(s); workloads {args.workloads}; config {args.config};"
        f" redis {url}; commit {base['commit']}; workdir {workdir}")
    ctx: Context | None = None
    status = 0
    try:
        args.model_dir.mkdir(parents=True, exist_ok=True)
        model, checkpoint = prepare_checkpoint(args, config_data, on_gpu)
        model_cfg = dict(config_data.get("model") or {})
        model_cfg.update(path=str(checkpoint), build_if_missing=False)
        config_data = deep_merge(config_data, {"model": model_cfg,
                                               "redis": {"url": url}})
        config_data.pop("metrics_port", None)
        check_limits(args.sizes, config_data)
        run_id = f"bs-{secrets.token_hex(4)}"
        base["run_id"] = run_id
        ctx = Context(args=args, sizes=args.sizes, deadline=deadline, workdir=workdir,
                      redis_url=url, client=client, config_data=config_data, model=model,
                      checkpoint=checkpoint, maker=PromptMaker(checkpoint), card=card,
                      on_gpu=on_gpu, device_count=device_count, base=base, run_id=run_id)
        ctx.flush()
        phases = {"system": run_system, "reliability": run_reliability, "scale": run_scale,
                  "priority": run_priority}
        for name in args.workloads:
            if name != "reliability" and ctx.shared_worker is not None:
                ctx.shared_worker[1].stop()  # the device goes to the next deployment
                ctx.shared_worker = None
                ctx.flush()
            phases[name](ctx)
    except (Interrupted, KeyboardInterrupt) as err:
        log(f"interrupted ({err}); stopping what was started, writing what was measured")
        status = 130
        for rec, _ in (ctx.records.values() if ctx is not None else ()):
            if rec["project"] is None and "project" not in rec["errors"]:
                rec["skipped"].setdefault("project", "interrupted")
    finally:
        # A second SIGTERM must not cut the clean-up short: it is what frees the device.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if ctx is not None:
            ctx.stop_all(INTERRUPTED_GRACE_S if status else STOP_GRACE_S)
            if ctx.control is not None:
                ctx.control.close()
            try:
                ctx.flush()
            except redis.RedisError as err:
                log(f"final flush failed: {err}")
            for key in list(ctx.records):
                ctx.save(key)
        if args.workdir is None:
            import shutil

            shutil.rmtree(workdir, ignore_errors=True)
    if ctx is not None:
        print_table([rec for rec, _ in ctx.records.values()])
        log(f"wrote {len(ctx.records)} JSON file(s) to {args.out}")
        if ctx.failed_checks and status == 0:
            log(f"checks failed: {ctx.failed_checks}")
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
