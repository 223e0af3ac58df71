"""The benchmark harness end to end on a CPU: tiny model, --quick sizes, the transformers
backend, every peer. Checks the JSON files BENCHMARKS.md asks for, not the speeds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
REQUIRED = {"workload", "model", "card", "gpus", "date", "commit", "unit", "project", "peers",
            "ratios", "reps", "settings", "torch", "transformers", "backend"}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One checkpoint folder for both runs: the first builds the tiny model, the second reuses
    it."""
    return tmp_path_factory.mktemp("models")


@pytest.mark.timeout(120)
def test_quick_cpu_run_writes_both_workloads(tmp_path: Path, models: Path) -> None:
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TIDEQ_COMMIT": "test-sha"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "bench_engine.py"), "--workload", "all",
         "--model", "tiny", "--quick", "--backend", "hf", "--device", "cpu", "--reps", "2",
         "--peer-reps", "1", "--out", str(out), "--model-dir", str(models)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=110,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tideq benchmarks" in proc.stdout  # the final table

    files = sorted(out.glob("*.json"))
    assert [f.name.split("_", 2)[2] for f in files] == ["w-latency_tiny.json",
                                                      "w-throughput_tiny.json"]
    records = {}
    for f in files:
        rec = json.loads(f.read_text())
        assert not REQUIRED - set(rec), REQUIRED - set(rec)
        date, card = f.name.split("_")[:2]
        assert date == rec["date"] and card.startswith("cpu")
        assert rec["commit"] == "test-sha" and rec["backend"] == "hf" and rec["gpus"] == 0
        assert rec["errors"] == {} and rec["skipped"] == {}, (rec["errors"], rec["skipped"])
        assert rec["project"] > 0
        assert all(v > 0 for v in rec["peers"].values())
        assert rec["details"]["project"]["reps"] == 2
        records[rec["workload"]] = rec

    thr = records["W-throughput"]
    assert thr["unit"] == "tokens/s" and thr["model"] == "tiny"
    assert set(thr["peers"]) == {"hf_generate_batch", "hf_generate_static64",
                                 "hf_generate_static256"}
    assert thr["ratios"]["vs_hf_generate_batch"] == pytest.approx(
        thr["project"] / thr["peers"]["hf_generate_batch"])
    runs = thr["details"]["project"]["runs"]
    assert all(r["short_outputs"] == 0 and r["output_tokens"] == 8 * 8 for r in runs)

    lat = records["W-latency"]
    assert set(lat["peers"]) == {"hf_generate", "hf_static_cache"}
    assert lat["floor"]["bandwidth_GBps"] > 0 and lat["floor"]["params"] > 0
    assert lat["ratios"]["fraction_of_floor"] == pytest.approx(
        lat["project"] / lat["floor"]["tokens_per_s"])
    assert "vs_hf_static_cache" in lat["ratios"]


@pytest.mark.timeout(60)
def test_failing_contender_is_recorded_and_the_run_goes_on(tmp_path: Path, models: Path) -> None:
    """An engine that cannot start (max_model_len 1 is invalid) fails the project; the peers
    still run and the JSON says why."""
    out = tmp_path / "results"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "bench_engine.py"), "--workload", "latency",
         "--model", "tiny", "--quick", "--backend", "hf", "--device", "cpu",
         "--peers", "hf_generate", "--reps", "1", "--out", str(out),
         "--model-dir", str(models), "--max-model-len", "1"],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True,
        text=True, timeout=55,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (f,) = out.glob("*.json")
    rec = json.loads(f.read_text())
    assert rec["project"] is None and "max_model_len" in rec["errors"]["project"]
    assert rec["peers"]["hf_generate"] > 0
    assert "fraction_of_floor" not in rec["ratios"]


@pytest.mark.timeout(120)
def test_queue_benchmark_runs_both_sides(tmp_path: Path, redis_url: str, tiny_llama: Path) -> None:
    """bench_queue.py with a few jobs: real workers on both sides, every job answered, the
    JSON BENCHMARKS.md asks for (W-queue: vs_plain_celery)."""
    out = tmp_path / "queue.json"
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "bench_queue.py"), "--jobs", "60", "--reps",
         "1", "--concurrency", "4", "--redis-url", redis_url, "--model", str(tiny_llama),
         "--out", str(out)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=110,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    record = json.loads(out.read_text())
    assert record["workload"] == "W-queue" and record["unit"] == "jobs/s"
    assert record["project"] > 0 and record["peers"]["plain_celery"] > 0
    ratio = record["project"] / record["peers"]["plain_celery"]
    assert record["ratios"]["vs_plain_celery"] == pytest.approx(ratio)
