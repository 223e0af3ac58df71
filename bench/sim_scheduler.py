"""The step loop's host work without a model: the scheduler and block manager of a worker's
engine fed a W-system-like stream (prompts of 40-470 random tokens, 128 output tokens, 512
requests outstanding, batch 256, 8,192 tokens a step), a fake token sampled for every
sequence. It shows what grows as consecutive batches pass through one engine: the prefix cache
fills up to `--blocks` and the garbage collector walks what it holds.

Per window of `--window` steps: mean, p99 and longest time of schedule() + postprocess(), and
full (generation 2) collections so far.

    python bench/sim_scheduler.py --caching on --seqs 16384 --out bench/results/X.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.core.kv_cache import BlockManager  # noqa: E402
from engine.core.scheduler import Scheduler  # noqa: E402
from engine.core.sequence import Sequence  # noqa: E402
from engine.request import SamplingParams  # noqa: E402

TOKEN = 7  # the fake model's token (never EOS: the requests ignore it anyway)


def simulate(caching: bool, seqs: int, blocks: int, window: int, seed: int) -> list[dict[str, Any]]:
    manager = BlockManager(blocks, 16, caching)
    scheduler = Scheduler(
        manager, max_num_seqs=256, max_num_batched_tokens=8192, reserved_high_slots=0,
        max_model_len=4096, eos_token_ids=[1],
    )  # fmt: skip
    rng = random.Random(seed)
    sampling = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    added = 0

    def add() -> None:
        nonlocal added
        prompt = [rng.randrange(2, 128_000) for _ in range(rng.randint(40, 470))]
        scheduler.add(Sequence(f"r{added}", prompt, sampling, 1, scheduler.next_arrival()))
        added += 1

    full_collections = 0

    def count(phase: str, info: dict[str, Any]) -> None:
        nonlocal full_collections
        if phase == "stop" and info["generation"] == 2:
            full_collections += 1

    gc.callbacks.append(count)
    try:
        rows: list[dict[str, Any]] = []
        times: list[float] = []
        while added < seqs:
            while len(scheduler.waiting) + len(scheduler.running) < 512:
                add()
            t0 = time.perf_counter()
            out = scheduler.schedule()
            scheduler.postprocess(out, [TOKEN] * len(out.sampling_chunks))
            times.append(time.perf_counter() - t0)
            if len(times) == window:
                times.sort()
                rows.append({
                    "requests_added": added, "cached_blocks": manager.num_cached_blocks,
                    "mean_ms": 1e3 * sum(times) / len(times),
                    "p99_ms": 1e3 * times[int(0.99 * len(times))], "max_ms": 1e3 * times[-1],
                    "full_collections": full_collections,
                })  # fmt: skip
                r = rows[-1]
                print(f"{added:6d} requests, {r['cached_blocks']:7d} cached blocks: step mean "
                      f"{r['mean_ms']:.3f} ms, p99 {r['p99_ms']:.2f}, max {r['max_ms']:.1f} ms;"
                      f" {full_collections} full collections", flush=True)
                times = []
        return rows
    finally:
        gc.callbacks.remove(count)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caching", choices=["on", "off"], default="on")
    parser.add_argument("--seqs", type=int, default=16384, help="requests in all")
    parser.add_argument("--blocks", type=int, default=200_000,
                        help="KV blocks (an H200's cache for the 1b model holds ~200k)")
    parser.add_argument("--window", type=int, default=2000, help="steps per row")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--label", default="", help="a note stored with the figures")
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write")
    args = parser.parse_args()
    rows = simulate(args.caching == "on", args.seqs, args.blocks, args.window, args.seed)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({
            "workload": "sim-scheduler", "caching": args.caching, "seqs": args.seqs,
            "blocks": args.blocks, "window_steps": args.window, "label": args.label,
            "python": sys.version.split()[0], "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
