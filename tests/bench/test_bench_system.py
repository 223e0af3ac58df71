"""bench/bench_system.py on a CPU: the tiny model, --quick sizes, a redis-server of the test's
own, real worker processes started as the README starts them. Checks the JSON files and that
every process the bench started is gone, not the speeds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from bench.bench_system import (
    group_members,
    high_only_workers_for,
    metrics_ports,
    percentile,
    scale_key,
    scale_points,
    summarize_jobs,
    worker_groups,
)
from tasks.store import JobRecord
from tests.redis_proc import RedisProcess

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "bench" / "bench_system.py"
# W-system jobs: enough that the timed run outlasts the bench's sampling interval (0.5 s) on
# a fast CPU, so that the worker's metrics are sampled during it (--quick's 16 took 0.3 s).
SYSTEM_JOBS = 512
REQUIRED = {"workload", "model", "card", "gpus", "date", "commit", "unit", "project", "peers",
            "ratios", "settings", "details", "errors", "skipped"}


@pytest.fixture
def models(tmp_path: Path, tiny_llama: Path) -> Path:
    """--model-dir holding the session's tiny checkpoint as `llama-tiny`, so the bench finds it
    built (it is what `--model tiny` would build)."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "llama-tiny").symlink_to(tiny_llama)
    return folder


def cpu_config(path: Path, redis_url: str) -> Path:
    """A CPU deployment: one worker of 8 threads, prompts up to 470 tokens, short leases so a
    killed worker's jobs come back within seconds."""
    path.write_text(yaml.safe_dump({
        "redis": {"url": redis_url, "lease_s": 2.0, "sweep_interval_s": 1.0},
        "model": {"path": "unused", "build_if_missing": False, "dtype": "float32",
                  "max_model_len": 1024},
        "limits": {"max_prompt_tokens": 512, "max_output_tokens": 64, "default_max_tokens": 16},
        "num_gpus": 0, "batch_size_per_gpu": 8, "num_workers": 8, "cancel_poll_s": 0.1,
    }))
    return path


def bench_cmd(config: Path, models: Path, out: Path, redis_url: str, *extra: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--config", str(config), "--model", "tiny",
            "--model-dir", str(models), "--quick", "--redis-url", redis_url, "--out", str(out),
            *extra]


@pytest.mark.timeout(180)
def test_quick_cpu_run_writes_system_and_reliability(
    tmp_path: Path, private_redis: RedisProcess, models: Path
) -> None:
    out = tmp_path / "results"
    config = cpu_config(tmp_path / "cpu.yaml", private_redis.url())
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TIDEQ_COMMIT": "test-sha"}
    proc = subprocess.run(
        bench_cmd(config, models, out, private_redis.url(), "--workload", "all",
                  "--kill-worker", "--jobs", str(SYSTEM_JOBS)),
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=170,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "tideq benchmarks" in proc.stdout  # the final table
    assert "W-scale N=1: not run" in proc.stdout  # on a CPU: no file, no failure

    files = sorted(f.name.split("_", 2)[2] for f in out.glob("*.json"))
    assert files == ["reliability_tiny.json", "w-system_tiny.json"]
    recs = {}
    for f in out.glob("*.json"):
        rec = json.loads(f.read_text())
        assert not REQUIRED - set(rec), REQUIRED - set(rec)
        assert rec["commit"] == "test-sha" and rec["gpus"] == 0 and rec["model"] == "tiny"
        assert rec["errors"] == {} and rec["skipped"] == {}, (rec["errors"], rec["skipped"])
        assert f.name.startswith(f"{rec['date']}_cpu")
        recs[rec["workload"]] = rec

    system = recs["W-system"]
    assert system["unit"] == "tokens/s" and system["project"] > 0
    assert system["peers"]["engine_alone"] > 0
    assert system["ratios"]["vs_engine_alone"] == pytest.approx(
        system["project"] / system["peers"]["engine_alone"])
    (run,) = system["details"]["runs"]
    assert run["jobs"] == SYSTEM_JOBS and run["states"] == {"done": SYSTEM_JOBS}
    # EOS never ended one:
    assert run["output_tokens"] == SYSTEM_JOBS * 8 and run["short_outputs"] == 0
    assert run["first_started_s"] > 0 and run["jobs_per_s"] > 0
    assert run["samples"]["samples"] >= 1  # the worker's metrics endpoint answered
    (alone,) = system["details"]["engine_alone"]["runs"]
    assert alone["jobs"] == SYSTEM_JOBS and alone["output_tokens"] == SYSTEM_JOBS * 8
    prompts = system["settings"]["reps"][0]
    assert 40 <= prompts["prompt_tokens_min"] <= prompts["prompt_tokens_max"] <= 470
    assert system["diagnostics"]["worker_start_s"] > 0

    rel = recs["reliability"]
    assert rel["jobs"] == 32 and rel["counts"] == {"done": 32}
    assert rel["ok"] is True and all(rel["checks"].values()), rel["checks"]
    assert rel["ratios"]["done_fraction"] == 1.0 and rel["project"] > 0
    assert rel["stuck"]["queue_lengths"] == {"high": 0, "low": 0}
    kill = rel["details"]["kill"]
    assert kill.get("new_worker_ready_s", 0) > 0, kill  # a worker was killed and replaced
    if kill["killed_jobs"]:  # jobs were running when the worker died: all ran again
        assert rel["recovery_s"] > 0 and kill["killed_not_rerun"] == []
        assert kill["killed_with_deliveries"] == kill["killed_jobs"]
    assert private_redis.client().dbsize() == 0  # the bench flushed its database


@pytest.mark.timeout(120)
def test_sigterm_stops_every_process_it_started(
    tmp_path: Path, private_redis: RedisProcess, models: Path
) -> None:
    """SIGTERM (what `timeout` sends) while a child process of the bench runs: the bench stops
    the child's process group, writes its file with the phase marked interrupted, exits 130.
    (Workers are stopped by the same code.)"""
    out = tmp_path / "results"
    config = cpu_config(tmp_path / "cpu.yaml", private_redis.url())
    log_path = tmp_path / "bench.log"
    with log_path.open("w") as log:
        bench = subprocess.Popen(
            bench_cmd(config, models, out, private_redis.url(), "--workload", "system"),
            cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        pid = None
        deadline = time.monotonic() + 90
        while pid is None and time.monotonic() < deadline and bench.poll() is None:
            for line in log_path.read_text().splitlines():
                if "started engine-alone (pid " in line:
                    pid = int(line.split("(pid ")[1].split(")")[0])
            time.sleep(0.05)
        assert pid is not None, log_path.read_text()[-3000:]
        assert group_members(pid)  # the child runs, in a process group of its own
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(60) == 130, log_path.read_text()[-3000:]
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()
    assert group_members(pid) == []
    (f,) = out.glob("*.json")
    rec = json.loads(f.read_text())
    assert rec["workload"] == "W-system" and rec["project"] is None
    assert rec["skipped"]["engine_alone"] == "interrupted"
    assert private_redis.client().dbsize() == 0


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 0.5) is None
    assert percentile([3.0], 0.99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 0.5) == pytest.approx(2.5)
    assert percentile(range(101), 0.99) == pytest.approx(99.0)


def test_summarize_jobs_counts_tokens_from_submit_to_last_result() -> None:
    def record(i: int, state: str, fin: float, tokens: int) -> JobRecord:
        fields = {"submitted_at": "100.0", "started_at": str(100.5 + i), "finished_at": str(fin)}
        result = {"completion_tokens": tokens, "prompt_tokens": 50, "finish_reason": "length",
                  "queued_s": 0.1, "first_token_s": 0.2, "worker": "w@h"}
        return JobRecord(f"b:L{i}", state, i, None, "low", None,
                         result if state == "done" else None, None, fields)

    records = [record(0, "done", 102.0, 8), record(1, "done", 104.0, 8),
               record(2, "failed", 103.0, 0)]
    out = summarize_jobs(records, t_submit=100.0, max_tokens=8)
    assert out["states"] == {"done": 2, "failed": 1}
    assert out["output_tokens"] == 16 and out["short_outputs"] == 0
    assert out["seconds"] == pytest.approx(4.0)
    assert out["tokens_per_s"] == pytest.approx(4.0)
    assert out["first_started_s"] == pytest.approx(0.5)
    assert out["workers"] == {"w@h": 2}


BENCH_CONFIGS = sorted(p.name for p in (REPO_ROOT / "bench" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("name", BENCH_CONFIGS)
def test_the_bench_s_lane_configs_are_the_shipped_one_with_a_lane(name: str) -> None:
    # The W-priority lane runs quote these files: each must load, and differ from the shipped
    # single-GPU config only in the fast lane's two keys.
    from tasks.config import load_config

    lane = load_config(REPO_ROOT / "bench" / "configs" / name)
    shipped = load_config(REPO_ROOT / "configs" / "gpu-1x.yaml")
    assert lane.engine.low_fraction_while_high < 1 and lane.engine.low_tokens_while_high > 0
    keys = {"low_fraction_while_high", "low_tokens_while_high"}
    assert lane.engine.model_dump(exclude=keys) == shipped.engine.model_dump(exclude=keys)
    assert lane.model_dump(exclude={"engine"}) == shipped.model_dump(exclude={"engine"})


def test_w_priority_runs_a_deployment_s_high_only_workers_as_shipped() -> None:
    shipped = yaml.safe_load((REPO_ROOT / "configs" / "gpu-4x-priority.yaml").read_text())
    isolated = {**shipped, "high_only_workers": 1}
    assert high_only_workers_for("priority", None, isolated) == 1
    assert high_only_workers_for("priority", None, shipped) == 0
    assert high_only_workers_for("priority", 0, isolated) == 0  # asked for on the command line
    assert high_only_workers_for("priority", 2, shipped) == 2
    assert high_only_workers_for("even", None, isolated) == 0  # `even` refuses them
    assert high_only_workers_for("priority", None, {}) == 0


def test_w_scale_runs_sharded_groups_after_the_one_gpu_workers_they_are_read_against() -> None:
    # The 8-GPU comparison: one-GPU workers on 1 and 8 GPUs, then four workers of two GPUs on 8.
    assert scale_points([8, 1], [2, 1]) == [(1, 1), (8, 1), (8, 2)]
    assert scale_points([1, 2, 3], [2]) == [(2, 2)]  # a group must fit whole
    assert scale_key(4, 1) == ("scale4", "4gpu")  # the one-GPU files keep their names
    assert scale_key(8, 2) == ("scale8-tp2", "8gpu-tp2")


def test_the_launcher_s_workers_are_counted_in_gpu_groups(tmp_path: Path) -> None:
    # The bench waits for, and samples the metrics of, one worker per group, not per GPU: a
    # group of two GPUs counted as two workers would wait for workers that never start.
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"gpus_per_worker": 2, "metrics_port": 9300}))
    assert worker_groups(config, 8) == 4
    assert metrics_ports(config, 8) == [9300, 9301, 9302, 9303]
    config.write_text(yaml.safe_dump({"metrics_port": 9300}))
    assert worker_groups(config, 2) == 2 and metrics_ports(config, 2) == [9300, 9301]
