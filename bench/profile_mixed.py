"""Where a mixed step's time goes: one rank's ModelRunner fed hand-built steps of decode rows
plus prefill chunks (the steps a flood of `low` requests makes), each timed on its own.

Per shape: wall time per step (sampled tokens back on the host), the host's share (until the
last kernel is queued) and the device's (first to last kernel), then Python's profiler and
torch.profiler over a few steps. Pure decode steps (captured graphs) are the reference.

    source .devbundle/enter.sh && python3 bench/profile_mixed.py --out $OUT
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name -> (decode rows, prefill chunk lengths); decode rows sit at a 300-token context.
SHAPES: dict[str, tuple[int, list[int]]] = {
    "decode-256": (256, []),
    "mixed-64+448": (64, [448]),
    "mixed-192+16x270": (192, [270] * 16),
    "mixed-255+1x128": (255, [128]),
    # the fast lane's steps while high work runs (lane 64 / 192): decode rows of 64 low
    # sequences and a high one, alone or with a 128-token chunk of a low prompt
    "decode-65": (65, []),
    # an idle worker's high request: the step the W-priority ratio is measured against
    "decode-1": (1, []),
    "mixed-65+128": (65, [128]),
    "prefill-8x512": (0, [512] * 8),
}
CONTEXT = 300


def build_step(decode: int, prefills: list[int], block_size: int, vocab: int) -> Any:
    """A SchedulerOutput of `decode` one-token chunks and one chunk per prefill length, every
    sequence with blocks of its own."""
    from engine.core.scheduler import ScheduledChunk, SchedulerOutput
    from engine.core.sequence import Sequence
    from engine.request import SamplingParams

    sampling = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    out = SchedulerOutput()
    next_block = 0

    def seq(name: str, tokens: int) -> Sequence:
        nonlocal next_block
        s = Sequence(name, [(7 * i) % (vocab - 1) + 1 for i in range(tokens)], sampling, 1, 0)
        blocks = -(-tokens // block_size)
        s.block_table = list(range(next_block, next_block + blocks))
        next_block += blocks
        return s

    for i in range(decode):
        s = seq(f"d{i}", CONTEXT)
        out.chunks.append(ScheduledChunk(s, CONTEXT - 1, 1, True, False))
    for i, n in enumerate(prefills):
        s = seq(f"p{i}", n)
        out.chunks.append(ScheduledChunk(s, 0, n, True, True))
    return out


def time_shape(runner: Any, step: Any, iters: int) -> dict[str, Any]:
    for _ in range(3):
        runner.execute(step)
    runner.profile = records = []
    walls = []
    for _ in range(iters):
        t0 = time.perf_counter()
        runner.execute(step)
        walls.append(time.perf_counter() - t0)
    runner.profile = None
    gpu = [r["gpu_s"] for r in records if r["gpu_s"] is not None]
    return {
        **launch_costs(runner, step, iters),
        "kind": records[-1]["kind"],
        "tokens": records[-1]["tokens"],
        "wall_ms": 1e3 * statistics.median(walls),
        "host_ms": 1e3 * statistics.median(r["host_s"] for r in records),
        "gpu_ms": 1e3 * statistics.median(gpu) if gpu else None,
    }


def launch_costs(runner: Any, step: Any, iters: int) -> dict[str, Any]:
    """The host's cost of queueing the step's captured graph alone (graph.replay(), the device
    idle) and, for a mixed step, of writing its inputs (fill), median of iters, in us."""
    import torch

    chunks = step.chunks
    graph, fill = None, None
    if all(c.num_tokens == 1 for c in chunks) and runner.graphs is not None:
        bs = runner.graphs.batch_size_for(len(chunks))
        graph = runner.graphs.graphs.get(bs) if bs is not None else None
    elif runner.mixed is not None:
        layout = runner.mixed.layout_for(sum(c.num_tokens for c in chunks), len(chunks))
        if layout is not None:
            graph = runner.mixed.graphs.get(layout.tokens)
            fill = lambda: runner.mixed._fill(0, layout, chunks)  # noqa: E731
    costs: dict[str, Any] = {"replay_us": None, "fill_us": None}
    for key, call in (("replay_us", graph.replay if graph is not None else None),
                      ("fill_us", fill)):
        if call is None:
            continue
        times = []
        for _ in range(iters):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            call()
            times.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        costs[key] = 1e6 * statistics.median(times)
    return costs


def python_profile(runner: Any, step: Any, iters: int, top: int) -> str:
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(iters):
        runner.execute(step)
    prof.disable()
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(top)
    body = text.getvalue()
    return body[body.find("ncalls"):]


def torch_profile(runner: Any, step: Any, iters: int, top: int) -> list[dict[str, Any]]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            runner.execute(step)
    events = prof.key_averages()
    # Kernels first, by their time on the device (kernels replayed from a captured graph
    # included), then the host's calls by their own time.
    rows = sorted(events, key=lambda e: (-e.self_device_time_total, -e.self_cpu_time_total))
    return [
        {"name": e.key[:90], "calls": e.count // iters,
         "self_cpu_us_per_step": e.self_cpu_time_total / iters,
         "device_us_per_step": e.self_device_time_total / iters}
        for e in rows[:top]
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpu-1x.yaml")
    parser.add_argument("--model", default="1b")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/tideq-bench-models"))
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--python-profile", action="store_true")
    parser.add_argument("--torch-profile", action="store_true")
    parser.add_argument("--set", action="append", default=[],
                        help="engine key=value override, e.g. mixed_graphs=false")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--commit", default=None, help="the commit measured (default: git's)")
    args = parser.parse_args()

    import torch
    from transformers import AutoConfig

    from bench.common import deployment_engine_config, gpu_checkpoint
    from engine.distributed import ParallelGroup
    from engine.executor.runner import ModelRunner

    path = gpu_checkpoint(args.model_dir, args.model)
    config = deployment_engine_config(args.config, path)
    for item in args.set:
        key, value = item.split("=", 1)
        old = getattr(config, key)
        config = replace(config, **{key: type(old)(value) if not isinstance(old, bool)
                                    else value.lower() in ("1", "true", "yes")})
    hf_config = AutoConfig.from_pretrained(path)
    device = torch.device("cuda")
    runner = ModelRunner(config, hf_config, device, torch.bfloat16, config.max_model_len,
                         ParallelGroup())
    results = []
    for name in args.shapes.split(","):
        decode, prefills = SHAPES[name]
        step = build_step(decode, prefills, config.block_size, hf_config.vocab_size)
        r = {"shape": name, "decode_rows": decode, "prefill_chunks": prefills,
             **time_shape(runner, step, args.iters)}
        gpu = f"{r['gpu_ms']:.2f}" if r["gpu_ms"] is not None else "-"
        print(f"{name}: {r['kind']}, {r['tokens']} tokens: wall {r['wall_ms']:.2f} ms, host "
              f"{r['host_ms']:.2f} ms, device {gpu} ms; replay {r['replay_us']} us, fill "
              f"{r['fill_us']} us", flush=True)
        if args.python_profile and r["kind"] == "eager":
            print(python_profile(runner, step, 5, 30), flush=True)
        if args.torch_profile:
            r["torch_profile"] = rows = torch_profile(runner, step, 3, 20)
            for row in rows:
                print(f"   device {row['device_us_per_step']:7.0f} us, host "
                      f"{row['self_cpu_us_per_step']:6.0f} us x{row['calls']:<5} {row['name']}",
                      flush=True)
        results.append(r)
    runner.close()
    from bench.common import card_name, git_commit, today, versions

    record = {
        "workload": "profile-mixed", "model": args.model, "card": card_name("cuda"),
        "date": today(), "commit": git_commit(args.commit), "gpus": 1, **versions(),
        "about": "bench/profile_mixed.py: hand-built steps on one ModelRunner (the config's"
                 " engine settings), median of --iters; with --torch-profile each shape's"
                 " kernels by device time per execute() (a decode step's execute also launches"
                 " its lookahead step)",
        "config": args.config, "overrides": args.set, "context": CONTEXT, "results": results,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"profile_mixed_{args.model}.json").write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
