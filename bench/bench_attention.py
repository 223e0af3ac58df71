"""Micro-benchmark: the paged decode-attention kernel (engine.kernels.attention) at the batch
sizes and contexts the workloads decode at, one GPU, in a CUDA graph over enough distinct KV
caches that they come from device memory, not L2; the default configuration against a sweep
of tile, warp, pipeline-stage and split choices (the engine's choice,
engine.kernels.attention.default_decode_config, is the "default" every row is read against).

Shapes (name: sequences, query heads, key/value heads, head dim, contexts):

    8b-tp2-b1   W-latency on 8b over two GPUs (one rank's heads), context 256
    8b-b1       W-latency on 8b, context 256
    1b-b1       W-latency on 1b, context 256
    1b-b65      W-priority's lane (64 low + 1 high), contexts 100-600
    1b-b256     W-throughput / W-system's full batch, contexts 100-600

    source .devbundle/enter.sh && TIDEQ_DISABLE_PDL=1 python3 bench/bench_attention.py --out $OUT

(PDL off: consecutive launches of the same kernel would otherwise overlap in the graph.)
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `engine` and `bench` importable
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.common import card_name, git_commit, log, today, versions, write_result  # noqa: E402
from engine.kernels.attention import (  # noqa: E402
    DecodeConfig,
    decode_attention,
    default_decode_config,
)

BLOCK_SIZE = 16
SHAPES: dict[str, tuple[int, int, int, int, tuple[int, int]]] = {
    "8b-tp2-b1": (1, 16, 4, 128, (256, 256)),
    "8b-b1": (1, 32, 8, 128, (256, 256)),
    "1b-b1": (1, 32, 8, 64, (256, 256)),
    "1b-b65": (65, 32, 8, 64, (100, 600)),
    "1b-b256": (256, 32, 8, 64, (100, 600)),
}
# Distinct caches each timed graph walks through: a model's layers, enough to leave L2.
CACHE_BYTES = 256 << 20
MAX_CACHES = 16


def configs(seqs: int, kv_heads: int) -> list[DecodeConfig]:
    """The engine's choice for this batch first (the figure the sweep is read against)."""
    out = [default_decode_config(seqs, kv_heads), DecodeConfig()]
    for block_n in (32, 64, 128):
        for warps in (2, 4, 8):
            for stages in (1, 2, 3):
                out.append(DecodeConfig(block_n=block_n, num_warps=warps, num_stages=stages))
    for warps in (4, 8):  # whole contexts in fewer, larger tiles
        for stages in (1, 2):
            out.append(DecodeConfig(block_n=256, num_warps=warps, num_stages=stages))
    for target in (2048, 4096, 8192):
        for min_split in (32, 64, 128):
            out.append(DecodeConfig(split_target=target, min_split=min_split))
    for min_split in (32, 128):
        out.append(DecodeConfig(min_split=min_split))
    return list(dict.fromkeys(out))


def bench_shape(name: str, reps: int) -> dict[str, Any]:
    seqs, heads, kv_heads, dim, (lo, hi) = SHAPES[name]
    gen = torch.Generator().manual_seed(0)
    lens = torch.randint(lo, hi + 1, (seqs,), generator=gen)
    blocks_per_seq = math.ceil(hi / BLOCK_SIZE)
    num_blocks = seqs * blocks_per_seq
    cache_bytes = 2 * num_blocks * BLOCK_SIZE * kv_heads * dim * 2
    copies = max(1, min(MAX_CACHES, CACHE_BYTES // cache_bytes))
    dev = torch.device("cuda")
    shape = (num_blocks, BLOCK_SIZE, kv_heads, dim)
    caches = [
        (torch.randn(shape, device=dev, dtype=torch.bfloat16),
         torch.randn(shape, device=dev, dtype=torch.bfloat16))
        for _ in range(copies)
    ]  # fmt: skip
    perm = torch.randperm(num_blocks, generator=gen)  # blocks scattered, as a busy cache's are
    tables = perm.view(seqs, blocks_per_seq).to(dev)
    q = torch.randn(seqs, heads, dim, device=dev, dtype=torch.bfloat16)
    rows = torch.arange(seqs, device=dev)
    ctx = lens.to(dev)
    counters = torch.zeros(seqs * kv_heads * 64, dtype=torch.int32, device=dev)
    scale = dim**-0.5
    want = torch.empty_like(q)
    decode_attention(q, *caches[0], want, rows, tables, ctx, counters, scale, 0)
    results = []
    for cfg in configs(seqs, kv_heads):
        out = torch.empty_like(q)
        try:
            decode_attention(q, *caches[0], out, rows, tables, ctx, counters, scale, 0, cfg)
            torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
            us = time_graph(lambda cfg=cfg, out=out: [
                decode_attention(q, k, v, out, rows, tables, ctx, counters, scale, 0, cfg)
                for k, v in caches], reps) / copies * 1e6  # fmt: skip
        except Exception as err:  # noqa: BLE001 - a configuration the compiler rejects
            log(f"  {name} {cfg}: {type(err).__name__}: {str(err)[:120]}")
            continue
        results.append({"config": asdict(cfg), "us": us})
    default_us = results[0]["us"]
    best = sorted(results, key=lambda r: r["us"])
    log(f"{name}: default {default_us:.2f} us; best " + "; ".join(
        f"{r['us']:.2f} {r['config']}" for r in best[:4]))  # fmt: skip
    return {"shape": name, "seqs": seqs, "heads": heads, "kv_heads": kv_heads, "head_dim": dim,
            "context": [lo, hi], "default_us": default_us, "best": best[:8],
            "all": results}


def time_graph(run: Any, reps: int) -> float:
    """Median seconds per replay of `run` captured in a CUDA graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    torch.cuda.synchronize()
    seconds = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", default=",".join(SHAPES))
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--commit", default=None)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention needs a CUDA device")
    rows = [bench_shape(name, args.reps) for name in args.shapes.split(",")]
    if args.out is not None:
        record = {"workload": "decode-attention", "model": "1b+8b", "card": card_name("cuda"),
                  "gpus": 1, "date": today(), "commit": git_commit(args.commit),
                  "unit": "us per decode-attention launch (CUDA graph, PDL off)",
                  "shapes": rows, "versions": versions()}
        log(f"wrote {write_result(args.out, record)}")


if __name__ == "__main__":
    main()
