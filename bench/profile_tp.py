"""Where a tensor-parallel decode step's time goes: W-latency's request (128-token prompt, 256
greedy tokens) on `8b`, each rank's backend stepped directly in its own process (no front, no
pipe between the ranks), with the runner's per-step timings and, on rank 0, a kernel profile.

Run for 1 rank and for 2 (push sums, and NCCL only), it separates the device's work
(kernels, collectives) from the host's (scheduling, launching, the pipe the engine core uses
to replay rank 0's calls, which this script leaves out).

    source .devbundle/enter.sh && python3 bench/profile_tp.py --out $OUT
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT_TOKENS = 128
OUTPUT_TOKENS = 256
TOP_KERNELS = 24


def _rank(rank: int, world: int, rendezvous: str, path: str, custom: bool, out: str) -> None:
    from engine.backends.native import NativeBackend
    from engine.config import EngineConfig
    from engine.distributed import ParallelGroup
    from engine.request import SamplingParams

    torch.cuda.set_device(rank)
    group = ParallelGroup()
    if world > 1:
        dist.init_process_group("nccl", init_method=f"file://{rendezvous}", rank=rank,
                                world_size=world)
        group = ParallelGroup(rank, world, dist.group.WORLD)
    config = EngineConfig(model_path=path, device="cuda", max_num_seqs=8,
                          max_model_len=1024, enable_prefix_caching=False,
                          shard_strategy="tensor" if world > 1 else "none", group_size=world,
                          custom_all_reduce=custom, kv_cache_memory_fraction=0.2)
    backend = NativeBackend(config, group)
    runner = backend.runner
    prompt = [(7 * i + 11) % 1000 + 100 for i in range(PROMPT_TOKENS)]
    sampling = SamplingParams(max_tokens=OUTPUT_TOKENS, temperature=0.0, ignore_eos=True)
    counter = iter(range(1 << 20))

    def one_request() -> tuple[float, int]:
        backend.add_request(f"r{next(counter)}", prompt, sampling, 1)
        steps = 0
        t_first = None
        while backend.has_unfinished():
            backend.step()
            steps += 1
            if t_first is None:
                torch.cuda.synchronize()
                t_first = time.perf_counter()
        torch.cuda.synchronize()
        return (OUTPUT_TOKENS - 1) / (time.perf_counter() - t_first), steps

    for _ in range(2):
        one_request()
    rates = [one_request()[0] for _ in range(3)]
    record: dict[str, Any] = {"world": world, "custom_all_reduce": custom,
                              "symmetric_used": group.world_size > 1
                              and runner.group.symmetric is not None,
                              "decode_tokens_per_s": sorted(rates)[1]}
    steps: list[dict[str, Any]] = []
    runner.profile = steps
    one_request()
    runner.profile = None
    by_kind: dict[str, Any] = {}
    for kind in sorted({s["kind"] for s in steps}):
        sel = [s for s in steps if s["kind"] == kind]
        gpu = [s["gpu_s"] for s in sel if s["gpu_s"] is not None]
        by_kind[kind] = {"steps": len(sel),
                         "host_ms": 1e3 * sum(s["host_s"] for s in sel) / len(sel),
                         "wait_ms": 1e3 * sum(s["wait_s"] for s in sel) / len(sel),
                         "gpu_ms": 1e3 * sum(gpu) / len(gpu) if gpu else None}
    record["by_kind"] = by_kind
    if rank == 0:
        # The engine benchmark's kernel profile: device time per kernel, graph replays included.
        from bench.bench_engine import kernel_profile

        kernels = kernel_profile(lambda: (one_request()[0], {}))
        record["kernel_ms"] = kernels["kernel_ms"]
        record["profiled_wall_ms"] = kernels["wall_ms"]
        record["top_kernels"] = kernels["top"][:TOP_KERNELS]
        Path(out).write_text(json.dumps(record))
    else:
        one_request()  # the same calls as rank 0: its collectives wait for these
    close = getattr(backend, "close", None)
    if close is not None:
        close()
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="8b")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/tideq-bench-models"))
    parser.add_argument("--runs", default="1:1,2:1,2:0", help="world:custom_all_reduce,...")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()
    from bench.common import gpu_checkpoint

    path = gpu_checkpoint(args.model_dir, args.model)
    records = []
    for item in args.runs.split(","):
        world, custom = (int(v) for v in item.split(":"))
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "out.json")
            mp.spawn(_rank, args=(world, os.path.join(tmp, "rdv"), str(path), bool(custom), out),
                     nprocs=world, join=True)
            rec = json.loads(Path(out).read_text())
        records.append(rec)
        print(f"world {world} custom {custom} (used {rec['symmetric_used']}): "
              f"{rec['decode_tokens_per_s']:.1f} tok/s; kernels {rec['kernel_ms']:.0f} ms of "
              f"{rec['profiled_wall_ms']:.0f} ms wall", flush=True)
        for kind, v in rec["by_kind"].items():
            print(f"  {kind}: {v['steps']} steps, host {v['host_ms']:.3f} ms, wait "
                  f"{v['wait_ms']:.3f} ms, gpu {v['gpu_ms'] or 0:.3f} ms", flush=True)
        for k in rec["top_kernels"]:
            print(f"    {k['device_ms']:8.1f} ms x{k['calls']:<6} {k['name']}", flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"profile_tp_{args.model}.json").write_text(json.dumps(records, indent=1))


if __name__ == "__main__":
    main()
