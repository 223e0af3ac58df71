"""Micro-benchmark: the weight-only int8 linear (engine.quant) against a bf16 matmul, per layer
of the `1b` and `8b` Llama shapes (BENCHMARKS.md), on one GPU, in the same run.

For each layer shape [N, K] (qkv, o, gate_up, down) and each M (rows of x, default 1: decode
of one sequence) it times, median of --reps:

    int8        engine.quant.int8_linear (the Triton kernel the engine uses at that M)
    bf16        torch.nn.functional.linear on a bf16 weight (cuBLAS)
    dequant     the plain-PyTorch path (dequantise on every call), the CPU path

each inside a CUDA graph (as the engine's decode steps run) over enough distinct weight copies
that the weights come from device memory, not L2; plus int8 and bf16 launched eagerly.
Reported: microseconds per call, weight bytes / time against the card's measured copy
bandwidth, and the speed-up of int8 over bf16. `--sweep` also times a small set of kernel
block configurations at each M and shows the best next to the default.

    python bench/bench_int8.py --model 1b,8b [--m 1,4,16] [--sweep] [--out DIR]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `engine` and `bench` importable
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import (  # noqa: E402
    card_name,
    git_commit,
    log,
    measure_bandwidth,
    today,
    versions,
    write_result,
)
from engine.quant import (  # noqa: E402
    DOT_MIN_BLOCK,
    GEMV_MAX_M,
    TRITON_MAX_M,
    KernelConfig,
    default_config,
    int8_linear,
    int8_linear_reference,
    int8_linear_triton,
)

# Linear layers of one decoder layer as [N, K] (BENCHMARKS.md shapes; head_dim 64 / 128).
LAYERS: dict[str, dict[str, tuple[int, int]]] = {
    "1b": {
        "qkv": ((32 + 2 * 8) * 64, 2048),
        "o": (2048, 2048),
        "gate_up": (2 * 8192, 2048),
        "down": (2048, 8192),
    },
    "8b": {
        "qkv": ((32 + 2 * 8) * 128, 4096),
        "o": (4096, 4096),
        "gate_up": (2 * 14336, 4096),
        "down": (4096, 14336),
    },
}
# Distinct bf16 weight bytes each timed graph walks through: several times any L2 (50-60 MB).
WORKING_SET_BYTES = 512 << 20
MIN_COPIES = 8


def sweep_configs(m: int) -> list[KernelConfig]:
    """A small neighbourhood of block configurations for m rows."""
    out = []
    if m <= GEMV_MAX_M:
        bm = 1 << max(0, m - 1).bit_length()
        for bn in (2, 4, 8, 16):
            for bk in (256, 512, 1024, 2048):
                for warps in (4, 8):
                    if bm * bn * bk <= 16384:  # fp32 accumulator: <= 128 per thread
                        out.append(KernelConfig(bm, bn, bk, num_warps=warps))
    else:
        bm = max(DOT_MIN_BLOCK, 1 << max(0, m - 1).bit_length())
        bm = min(bm, 64)
        for bn in (16, 32, 64, 128):
            for bk in (64, 128, 256):
                for stages in (3, 4, 5):
                    out.append(KernelConfig(bm, bn, bk, num_warps=4, num_stages=stages))
    return out


def time_calls(calls: list[Callable[[], Any]], reps: int, graph: bool) -> float:
    """Median seconds per call of running `calls` in order, in a CUDA graph or eagerly."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles, settles the allocator
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    run: Callable[[], Any]
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for call in calls:
                call()
        run = g.replay
    else:

        def run() -> None:
            for call in calls:
                call()

    run()
    torch.cuda.synchronize()
    seconds = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        seconds.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(seconds)


def bench_layer(n: int, k: int, m: int, reps: int, sweep: bool, bandwidth: float) -> dict[str, Any]:
    """Every contender on one [N, K] layer at M rows: a dict of figures."""
    copies = max(MIN_COPIES, math.ceil(WORKING_SET_BYTES / (2 * n * k)))
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=gen)
    w16 = [
        torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=gen) * 0.02
        for _ in range(copies)
    ]
    scales = [w.float().abs().amax(1).div(127) for w in w16]
    q8 = [
        torch.round(w.float() / s[:, None]).to(torch.int8) for w, s in zip(w16, scales, strict=True)
    ]
    scales = [s.bfloat16() for s in scales]  # the loader keeps scales in the model dtype

    def int8_calls(config: KernelConfig | None = None) -> list[Callable[[], Any]]:
        if config is None:
            return [lambda q=q, s=s: int8_linear(x, q, s) for q, s in zip(q8, scales, strict=True)]
        return [
            lambda q=q, s=s: int8_linear_triton(x, q, s, config=config)
            for q, s in zip(q8, scales, strict=True)
        ]

    bf16_calls = [lambda w=w: F.linear(x, w) for w in w16]
    dequant_calls = [
        lambda q=q, s=s: int8_linear_reference(x, q, s) for q, s in zip(q8, scales, strict=True)
    ]
    # The kernel against the dequantise-and-matmul path on the same int8 weight (bf16 output).
    torch.testing.assert_close(
        int8_linear(x, q8[0], scales[0]),
        int8_linear_reference(x, q8[0], scales[0]),
        rtol=2e-2,
        atol=2e-2,
    )
    us = {
        "int8": time_calls(int8_calls(), reps, graph=True) * 1e6,
        "bf16": time_calls(bf16_calls, reps, graph=True) * 1e6,
        "dequant": time_calls(dequant_calls, reps, graph=True) * 1e6,
        "int8_eager": time_calls(int8_calls(), reps, graph=False) * 1e6,
        "bf16_eager": time_calls(bf16_calls, reps, graph=False) * 1e6,
    }
    row: dict[str, Any] = {
        "N": n,
        "K": k,
        "M": m,
        "copies": copies,
        "us": us,
        "config": str(default_config(m)) if m <= TRITON_MAX_M else "dequantise + cuBLAS",
        "int8_fraction_of_copy_bw": n * k / (us["int8"] * 1e-6) / bandwidth,
        "bf16_fraction_of_copy_bw": 2 * n * k / (us["bf16"] * 1e-6) / bandwidth,
        "int8_speedup_vs_bf16": us["bf16"] / us["int8"],
    }
    if sweep:
        timed = []
        for config in sweep_configs(m):
            try:
                timed.append((time_calls(int8_calls(config), reps, graph=True) * 1e6, config))
            except Exception as err:  # a configuration the compiler rejects: skip it
                log(f"    {config}: {type(err).__name__}: {str(err)[:120]}")
        timed.sort(key=lambda t: t[0])
        row["sweep_best"] = [{"us": t, "config": str(c)} for t, c in timed[:5]]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="1b,8b", help="comma-separated: 1b, 8b")
    parser.add_argument("--m", default="1", help="comma-separated rows of x, e.g. 1,4,16")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time block configurations")
    parser.add_argument("--out", type=Path, default=None, help="write one JSON per model here")
    parser.add_argument("--commit", default=None, help="the commit measured (no .git there)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_int8 needs a CUDA device")
    card = card_name("cuda")
    bandwidth = measure_bandwidth("cuda", 1 << 30)["bytes_per_s"]
    log(f"{card}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    ms = [int(v) for v in args.m.split(",")]
    for model in args.model.split(","):
        rows = []
        for name, (n, k) in LAYERS[model].items():
            for m in ms:
                row = bench_layer(n, k, m, args.reps, args.sweep, bandwidth)
                torch.cuda.empty_cache()  # the layer's weight copies
                row["layer"] = name
                rows.append(row)
                us = row["us"]
                log(
                    f"{model} {name:8s} N={n:6d} K={k:6d} M={m:4d}  int8 {us['int8']:8.2f} us"
                    f" ({row['int8_fraction_of_copy_bw']:.0%} of copy bw)"
                    f"  bf16 {us['bf16']:8.2f} us ({row['bf16_fraction_of_copy_bw']:.0%})"
                    f"  x{row['int8_speedup_vs_bf16']:.2f}"
                    f"  dequant {us['dequant']:8.2f}  eager int8/bf16 {us['int8_eager']:.1f}/"
                    f"{us['bf16_eager']:.1f} us  [{row['config']}]"
                )
                for best in row.get("sweep_best", []):
                    log(f"      sweep {best['us']:8.2f} us  {best['config']}")
        for m in ms:
            at_m = [r for r in rows if r["M"] == m]
            int8_us = sum(r["us"]["int8"] for r in at_m)
            bf16_us = sum(r["us"]["bf16"] for r in at_m)
            log(
                f"{model} M={m}: one decoder layer's linears int8 {int8_us:.1f} us, bf16"
                f" {bf16_us:.1f} us: x{bf16_us / int8_us:.2f}"
            )
        if args.out is not None:
            m0 = [r for r in rows if r["M"] == ms[0]]
            int8_us = sum(r["us"]["int8"] for r in m0)
            bf16_us = sum(r["us"]["bf16"] for r in m0)
            record = {
                "workload": "int8-linear",
                "model": model,
                "card": card,
                "gpus": 1,
                "date": today(),
                "commit": git_commit(args.commit),
                "unit": f"us per decoder layer's linears at M={ms[0]} (CUDA graph)",
                "project": int8_us,
                "peers": {"bf16_matmul": bf16_us},
                "ratios": {"vs_bf16_matmul": bf16_us / int8_us},
                "copy_bandwidth_bytes_per_s": bandwidth,
                "layers": rows,
                "versions": versions(),
            }
            log(f"wrote {write_result(args.out, record)}")


if __name__ == "__main__":
    main()
