"""Does the engine slow down over consecutive batches? The W-system workload (2,048 prompts of
40-470 random tokens, 128 greedy tokens each) run --batches times in a row on the engine
alone, with the GPU's SM clock, power and temperature read after each batch and the core's
counters (cached blocks, steps), once per prefix-caching setting.

    source .devbundle/enter.sh && python3 bench/probe_drift.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def gpu_state() -> str:
    try:
        fields = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
        return subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"nvidia-smi: {err}"


def run(base: Any, caching: bool, batches: int, jobs: int, vocab: int) -> list[dict[str, Any]]:
    from engine.engine import Engine
    from engine.request import Request, SamplingParams

    engine = Engine(replace(base, enable_prefix_caching=caching))
    rng = random.Random(0)
    sampling = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    rows = []
    try:
        for b in range(batches):
            reqs = [Request(f"b{b}-{i}", prompt_token_ids=[
                rng.randrange(100, vocab - 1) for _ in range(rng.randint(40, 470))],
                sampling=sampling) for i in range(jobs)]
            t0 = time.perf_counter()
            done = engine.generate(reqs)
            seconds = time.perf_counter() - t0
            tokens = sum(len(c.token_ids) for c in done)
            stats = engine.stats()
            row = {"batch": b, "tokens_per_s": tokens / seconds, "seconds": seconds,
                   "steps": stats.get("steps"), "kv_blocks_cached": stats.get("kv_blocks_cached"),
                   "kv_blocks_free": stats.get("kv_blocks_free"), "gpu": gpu_state()}
            rows.append(row)
            print(f"caching {caching} batch {b}: {row['tokens_per_s']:,.0f} tok/s"
                  f" ({seconds:.2f}s) steps {row['steps']} cached {row['kv_blocks_cached']}"
                  f" | {row['gpu']}", flush=True)
    finally:
        engine.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpu-1x.yaml")
    parser.add_argument("--model", default="1b")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/tideq-bench-models"))
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--jobs", type=int, default=2048)
    parser.add_argument("--caching", default="on,off")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    from bench.common import deployment_engine_config, gpu_checkpoint

    path = gpu_checkpoint(args.model_dir, args.model)
    base = deployment_engine_config(args.config, path)
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    result = {"config": args.config, "jobs": args.jobs, "runs": {}}
    for setting in args.caching.split(","):
        result["runs"][setting] = run(base, setting == "on", args.batches, args.jobs, vocab)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"probe_drift_{args.model}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
