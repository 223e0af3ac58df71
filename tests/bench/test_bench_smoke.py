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


@pytest.mark.timeout(180)
def test_quick_cpu_run_of_the_engine_variants(tmp_path: Path, models: Path) -> None:
    """The core in a thread against the core process, and the sharded variants over two gloo
    ranks (W-latency, the native backend): each variant's figure, GPUs, ranks, floor and
    ratio to the headline, and the W-tp record (tp2 against the 1-device figure)."""
    out = tmp_path / "results"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TIDEQ_COMMIT": "test-sha"}
    proc = subprocess.run(
        [sys.executable, str(REPO_ROOT / "bench" / "bench_engine.py"), "--workload", "latency",
         "--model", "tiny", "--quick", "--backend", "native", "--device", "cpu", "--dtype",
         "float32", "--peers", "none", "--reps", "1", "--variants", "thread,tp2,layer2,fast",
         "--out", str(out), "--model-dir", str(models)],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=170,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = {f.name.split("_", 2)[2]: json.loads(f.read_text()) for f in out.glob("*.json")}
    assert set(files) == {"w-latency_tiny.json", "w-tp_tiny.json"}

    lat = files["w-latency_tiny.json"]
    assert not REQUIRED - set(lat), REQUIRED - set(lat)
    assert lat["errors"] == {} and lat["skipped"] == {}, (lat["errors"], lat["skipped"])
    variants = ["fast", "thread", "tp2", "layer2"]  # fast first: the headline
    assert lat["project_variant"] == "fast" and list(lat["project_variants"]) == variants
    assert all(v > 0 for v in lat["project_variants"].values())
    assert lat["project"] == lat["project_variants"]["fast"]
    assert lat["gpus"] == 0 and lat["variant_gpus"] == dict.fromkeys(variants, 0)
    assert lat["variant_ranks"] == {"fast": 1, "thread": 1, "tp2": 2, "layer2": 2}
    settings = lat["settings"]["variant_settings"]
    assert settings["thread"]["core"] == "thread" and settings["fast"]["core"] == "process"
    assert settings["tp2"] == {**settings["fast"], "shard_strategy": "tensor", "group_size": 2,
                               "distributed_backend": "gloo"}
    assert settings["layer2"]["shard_strategy"] == "layer"
    # A tensor group reads half of the weights per device: half a device's floor; the layer
    # split's ranks take turns: one device's floor.
    one = lat["floor"]["ms_per_token"]
    assert lat["variant_floor_ms_per_token"] == pytest.approx(
        {"fast": one, "thread": one, "tp2": one / 2, "layer2": one})
    for name in variants:
        assert lat["variant_fraction_of_floor"][name] == pytest.approx(
            lat["project_variants"][name] * lat["variant_floor_ms_per_token"][name] / 1e3)
        if name != "fast":
            assert lat["ratios"][f"{name}_vs_fast"] == pytest.approx(
                lat["project_variants"][name] / lat["project"])
        assert lat["details"][result_key(name)]["startup_s"] > 0

    tp = files["w-tp_tiny.json"]
    assert not REQUIRED - set(tp), REQUIRED - set(tp)
    assert tp["workload"] == "W-tp" and tp["errors"] == {} and tp["skipped"] == {}
    assert tp["project"] == lat["project_variants"]["tp2"] and tp["gpus"] == 0
    assert tp["one_gpu"]["variant"] == "fast" and tp["one_gpu"]["median"] == lat["project"]
    assert tp["ratios"]["vs_1gpu"] == pytest.approx(tp["project"] / lat["project"])
    assert tp["floor"]["ranks"] == 2 and tp["floor"]["ms_per_token"] == pytest.approx(one / 2)
    assert tp["ratios"]["fraction_of_floor"] == pytest.approx(
        lat["variant_fraction_of_floor"]["tp2"])


def result_key(variant: str) -> str:
    return "project" if variant == "fast" else f"project_{variant}"


@pytest.mark.timeout(120)
def test_the_cpu_simulations_of_the_step_loop_run(tmp_path: Path) -> None:
    """sim_scheduler.py and sim_decode_host.py at small sizes. The second drives the runner's
    decode path through its internals (no model): this keeps it in step with them."""
    runs = {
        "sim_scheduler.py": ["--caching", "on", "--seqs", "600", "--blocks", "5000",
                             "--window", "100"],
        "sim_decode_host.py": ["--seqs", "16", "--steps", "20"],
    }
    records = {}
    for script, args in runs.items():
        out = tmp_path / f"{script}.json"
        proc = subprocess.run(
            [sys.executable, str(REPO_ROOT / "bench" / script), *args, "--out", str(out)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=100,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        records[script] = json.loads(out.read_text())
    rows = records["sim_scheduler.py"]["rows"]
    assert rows and all(r["mean_ms"] > 0 and r["cached_blocks"] > 0 for r in rows)
    host = records["sim_decode_host.py"]
    assert host["workload"] == "sim-decode-host" and host["seqs"] == 16
    assert host["ms_per_step"] > 0
