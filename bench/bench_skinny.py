"""Micro-benchmark: linear layers at decode batches of a few dozen rows (the fast lane's 65
sequences, a small server's batch), cuBLAS against engine.kernels.skinny_gemm, on the `1b` and
`8b` Llama shapes, one GPU, each inside a CUDA graph over enough weight copies that the
weights come from device memory (bench_gemv.py's harness).

For each layer [N, K] and each M, median of --reps, microseconds per call and the fraction of
the card's copy bandwidth the weight bytes reach; `--sweep` also times block configurations
at the sweep's M values and lists the best next to the default.

    python bench/bench_skinny.py --model 1b,8b --m 16,32,65,128 [--sweep 65] [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `engine` and `bench` importable
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.bench_gemv import LAYERS, MIN_COPIES, WORKING_SET_BYTES, time_calls  # noqa: E402
from bench.common import (  # noqa: E402
    card_name,
    git_commit,
    log,
    measure_bandwidth,
    today,
    versions,
    write_result,
)
from engine.kernels.skinny_gemm import SkinnyConfig, default_config, skinny_gemm  # noqa: E402


def sweep_configs() -> list[SkinnyConfig]:
    out = []
    for bn, bk, split, warps, stages in itertools.product(
        (32, 64, 128), (64, 128), (1, 2, 4, 8), (4, 8), (3, 5)
    ):
        out.append(SkinnyConfig(bn, bk, split, num_warps=warps, num_stages=stages))
    return out


def bench_layer(name: str, n: int, k: int, m: int, reps: int, sweep: bool,
                bandwidth: float) -> dict[str, Any]:
    copies = max(MIN_COPIES, math.ceil(WORKING_SET_BYTES / (2 * n * k)))
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    x = randn(m, k)
    weights = [randn(n, k) * 0.02 for _ in range(copies)]

    def skinny_calls(config: SkinnyConfig | None = None) -> list[Callable[[], Any]]:
        return [lambda w=w: skinny_gemm(x, w, config=config) for w in weights]

    want = F.linear(x, weights[0])
    torch.testing.assert_close(skinny_gemm(x, weights[0]), want, rtol=2e-2, atol=2e-2)
    us = {
        "cublas": time_calls([lambda w=w: F.linear(x, w) for w in weights], reps, True) * 1e6,
        "skinny": time_calls(skinny_calls(), reps, graph=True) * 1e6,
    }
    row: dict[str, Any] = {
        "layer": name, "N": n, "K": k, "M": m, "copies": copies, "us": us,
        "config": str(default_config(m, n, k)),
        "cublas_fraction_of_copy_bw": 2 * n * k / (us["cublas"] * 1e-6) / bandwidth,
        "skinny_fraction_of_copy_bw": 2 * n * k / (us["skinny"] * 1e-6) / bandwidth,
    }
    if sweep:
        timed = []
        for config in sweep_configs():
            try:
                got = skinny_gemm(x, weights[0], config=config)
                torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
                timed.append((time_calls(skinny_calls(config), reps, graph=True) * 1e6, config))
            except Exception as err:  # a configuration the compiler rejects: skip it
                log(f"    {config}: {type(err).__name__}: {str(err)[:120]}")
        timed.sort(key=lambda t: t[0])
        row["sweep"] = [{"us": t, "config": str(c)} for t, c in timed[:8]]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="1b,8b", help="comma-separated: 1b, 8b, 8b-tp2")
    parser.add_argument("--m", default="16,32,65,128", help="comma-separated rows of x")
    parser.add_argument("--sweep", default="", help="comma-separated M values to sweep at")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None, help="write one JSON per model here")
    parser.add_argument("--commit", default=None, help="the commit measured (no .git there)")
    args = parser.parse_args()
    sweep_m = {int(v) for v in args.sweep.split(",") if v}
    bandwidth = measure_bandwidth("cuda", 1 << 30)["bytes_per_s"]
    log(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    for model in args.model.split(","):
        rows = []
        for m in (int(v) for v in args.m.split(",")):
            for name, (n, k) in LAYERS[model].items():
                row = bench_layer(name, n, k, m, args.reps, m in sweep_m, bandwidth)
                rows.append(row)
                us = row["us"]
                line = (f"{model} {name:8s} M={m:3d} [{n}x{k}]: cublas {us['cublas']:6.1f} us"
                        f" ({row['cublas_fraction_of_copy_bw']:.0%}), skinny {us['skinny']:6.1f}"
                        f" us ({row['skinny_fraction_of_copy_bw']:.0%}) {row['config']}")
                log(line)
                for best in row.get("sweep", [])[:3]:
                    log(f"      {best['us']:6.1f} us {best['config']}")
        if args.out:
            record = {
                "workload": "skinny-gemm", "model": model, "card": card_name("cuda"),
                "date": today(), "commit": git_commit(args.commit), "gpus": 1, **versions(),
                "unit": "us", "copy_bandwidth": bandwidth,
                "about": "bench/bench_skinny.py: cuBLAS (F.linear) against"
                         " engine.kernels.skinny_gemm on bf16 weights, each in a CUDA graph",
                "results": rows,
            }
            log(f"wrote {write_result(args.out, record)}")


if __name__ == "__main__":
    main()
