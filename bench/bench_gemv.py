"""Micro-benchmark: decode-sized linear layers on the `1b` and `8b` Llama shapes
(BENCHMARKS.md), one GPU, every contender in the same run, each inside a CUDA graph (as the
engine's decode steps run) over enough distinct weight copies that the weights come from device
memory, not L2.

For each layer shape [N, K] (qkv, o, gate_up, down) and each M (rows of x, default 1: decode of
one sequence), median of --reps, microseconds per call:

    cublas       torch.nn.functional.linear on a bf16 weight
    gemv         engine.kernels.gemv.gemv on the same bf16 weight
    gemv_int8    the same kernel on an int8 weight with row scales (int8 layers' decode path)

and the fused inputs against the kernels they replace (M = 1):

    qkv, gate_up   RMSNorm(x + residual) then cublas   vs   gemv with the norm fused in
    down           SiLU(gate) * up then cublas          vs   gemv with the activation fused in

plus greedy argmax over a 128k vocabulary: torch.argmax against engine.kernels.argmax.
Reported: weight bytes / time against the card's measured copy bandwidth. `--sweep` also times
block configurations at M = 1 and lists the best next to the default.

    python bench/bench_gemv.py --model 1b,8b [--m 1,2,4] [--sweep] [--out DIR]
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
from engine.kernels import elementwise  # noqa: E402
from engine.kernels.argmax import argmax  # noqa: E402
from engine.kernels.gemv import GemvConfig, default_config, gemv  # noqa: E402

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
    # What each rank of `8b` sharded over 2 GPUs (tensor) multiplies: qkv and gate_up split by
    # output features, o and down by input features.
    "8b-tp2": {
        "qkv": ((32 + 2 * 8) * 128 // 2, 4096),
        "o": (4096, 4096 // 2),
        "gate_up": (14336, 4096),
        "down": (4096, 14336 // 2),
    },
}
VOCAB = 128256
EPS = 1e-5
# Distinct bf16 weight bytes each timed graph walks through: several times any L2 (50-60 MB).
WORKING_SET_BYTES = 512 << 20
MIN_COPIES = 8


def sweep_configs() -> list[GemvConfig]:
    """Block configurations for M = 1: the fp32 accumulator (block_n * block_k / threads per
    thread) kept between 8 and 128 values. (num_stages 3 measured no different from 1 with
    the kernel's own one-tile-ahead loads.)"""
    out = []
    for bn in (2, 4, 8, 16):
        for bk in (512, 1024, 2048):
            for warps in (2, 4, 8):
                per_thread = bn * bk // (32 * warps)
                if 8 <= per_thread <= 128:
                    out.append(GemvConfig(bn, bk, num_warps=warps))
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


def bench_layer(
    name: str, n: int, k: int, m: int, reps: int, sweep: bool, bandwidth: float
) -> dict[str, Any]:
    """Every contender on one [N, K] layer at M rows: a dict of figures."""
    copies = max(MIN_COPIES, math.ceil(WORKING_SET_BYTES / (2 * n * k)))
    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=gen)

    in_k = 2 * k if name == "down" else k  # down's fused input is gate | up
    x = randn(m, in_k)
    res, norm_w = randn(m, k), randn(k)
    w16 = [randn(n, k) * 0.02 for _ in range(copies)]
    scales = [w.float().abs().amax(1).div(127) for w in w16]
    q8 = [
        torch.round(w.float() / s[:, None]).to(torch.int8) for w, s in zip(w16, scales, strict=True)
    ]
    scales = [s.bfloat16() for s in scales]  # the loader keeps scales in the model dtype
    xk = x[:, :k].contiguous()  # the plain layers' input

    def gemv_calls(config: GemvConfig | None = None) -> list[Callable[[], Any]]:
        return [lambda w=w: gemv(xk, w, config=config) for w in w16]

    calls: dict[str, list[Callable[[], Any]]] = {
        "cublas": [lambda w=w: F.linear(xk, w) for w in w16],
        "gemv": gemv_calls(),
        "gemv_int8": [
            lambda q=q, s=s: gemv(xk, q, scale=s) for q, s in zip(q8, scales, strict=True)
        ],
    }
    torch.testing.assert_close(gemv(xk, w16[0])[0], F.linear(xk, w16[0]), rtol=2e-2, atol=2e-2)
    if m == 1 and name in ("qkv", "gate_up"):
        calls["unfused"] = [
            lambda w=w: F.linear(elementwise.rms_norm(xk, norm_w, EPS, res)[0], w) for w in w16
        ]
        calls["fused"] = [
            lambda w=w: gemv(xk, w, norm_weight=norm_w, eps=EPS, residual=res) for w in w16
        ]
        want = F.linear(elementwise.rms_norm(xk, norm_w, EPS, res)[0], w16[0])
        got = gemv(xk, w16[0], norm_weight=norm_w, eps=EPS, residual=res)[0]
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    if m == 1 and name == "down":
        calls["unfused"] = [lambda w=w: F.linear(elementwise.silu_and_mul(x), w) for w in w16]
        calls["fused"] = [lambda w=w: gemv(x, w, silu_mul=True) for w in w16]
        want = F.linear(elementwise.silu_and_mul(x), w16[0])
        torch.testing.assert_close(gemv(x, w16[0], silu_mul=True)[0], want, rtol=2e-2, atol=2e-2)
    us = {key: time_calls(c, reps, graph=True) * 1e6 for key, c in calls.items()}
    row: dict[str, Any] = {
        "layer": name,
        "N": n,
        "K": k,
        "M": m,
        "copies": copies,
        "us": us,
        "config": str(default_config(m, n, k, False)),
        "cublas_fraction_of_copy_bw": 2 * n * k / (us["cublas"] * 1e-6) / bandwidth,
        "gemv_fraction_of_copy_bw": 2 * n * k / (us["gemv"] * 1e-6) / bandwidth,
        "gemv_int8_fraction_of_copy_bw": n * k / (us["gemv_int8"] * 1e-6) / bandwidth,
    }
    if sweep and m == 1:
        # The kernel as the model calls it on this layer: with the norm in front of qkv and
        # gate_up, the activation in front of down, plain on o.
        def model_calls(config: GemvConfig) -> list[Callable[[], Any]]:
            if name == "down":
                return [lambda w=w: gemv(x, w, silu_mul=True, config=config) for w in w16]
            if name in ("qkv", "gate_up"):
                return [
                    lambda w=w: gemv(
                        xk, w, norm_weight=norm_w, eps=EPS, residual=res, config=config
                    )
                    for w in w16
                ]
            return gemv_calls(config)

        for label in ("bf16", "fused"):
            timed = []
            for config in sweep_configs():
                sweep_calls = gemv_calls(config) if label == "bf16" else model_calls(config)
                try:
                    timed.append((time_calls(sweep_calls, reps, graph=True) * 1e6, config))
                except Exception as err:  # a configuration the compiler rejects: skip it
                    log(f"    {config}: {type(err).__name__}: {str(err)[:120]}")
            timed.sort(key=lambda t: t[0])
            row[f"sweep_{label}"] = [{"us": t, "config": str(c)} for t, c in timed[:6]]
    return row


def bench_argmax(reps: int) -> dict[str, float]:
    """torch.argmax and the two-stage Triton argmax on one row of 128k bf16 logits (us)."""
    logits = torch.randn(1, VOCAB, device="cuda", dtype=torch.bfloat16)
    assert torch.equal(argmax(logits), logits.argmax(-1))
    return {
        "torch": time_calls([lambda: logits.argmax(-1)] * 16, reps, graph=True) * 1e6,
        "triton": time_calls([lambda: argmax(logits)] * 16, reps, graph=True) * 1e6,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="1b,8b", help="comma-separated: 1b, 8b, 8b-tp2")
    parser.add_argument("--m", default="1", help="comma-separated rows of x, e.g. 1,2,4")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--sweep", action="store_true", help="also time block configurations")
    parser.add_argument("--out", type=Path, default=None, help="write one JSON per model here")
    parser.add_argument("--commit", default=None, help="the commit measured (no .git there)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemv needs a CUDA device")
    card = card_name("cuda")
    bandwidth = measure_bandwidth("cuda", 1 << 30)["bytes_per_s"]
    log(f"{card}: copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)")
    am = bench_argmax(args.reps)
    log(f"argmax over {VOCAB}: torch {am['torch']:.2f} us, triton {am['triton']:.2f} us")
    ms = [int(v) for v in args.m.split(",")]
    for model in args.model.split(","):
        rows = []
        for name, (n, k) in LAYERS[model].items():
            for m in ms:
                row = bench_layer(name, n, k, m, args.reps, args.sweep, bandwidth)
                torch.cuda.empty_cache()  # the layer's weight copies
                rows.append(row)
                us = row["us"]
                fused = (
                    f"  unfused {us['unfused']:7.2f} fused {us['fused']:7.2f}"
                    if "fused" in us
                    else ""
                )
                log(
                    f"{model} {name:8s} N={n:6d} K={k:6d} M={m}  cublas {us['cublas']:7.2f} us"
                    f" ({row['cublas_fraction_of_copy_bw']:.0%})  gemv {us['gemv']:7.2f}"
                    f" ({row['gemv_fraction_of_copy_bw']:.0%})  int8 {us['gemv_int8']:7.2f}"
                    f" ({row['gemv_int8_fraction_of_copy_bw']:.0%}){fused}  [{row['config']}]"
                )
                for label in ("bf16", "fused"):
                    for best in row.get(f"sweep_{label}", []):
                        log(f"      sweep {label} {best['us']:8.2f} us  {best['config']}")
        for m in ms:
            at_m = [r for r in rows if r["M"] == m]
            totals = {
                key: sum(r["us"][key] for r in at_m) for key in ("cublas", "gemv", "gemv_int8")
            }
            log(f"{model} M={m}: one decoder layer's linears (us) {totals}")
        if args.out is not None:
            m0 = [r for r in rows if r["M"] == ms[0]]
            gemv_us = sum(r["us"]["gemv"] for r in m0)
            cublas_us = sum(r["us"]["cublas"] for r in m0)
            record = {
                "workload": "decode-linear",
                "model": model,
                "card": card,
                "gpus": 1,
                "date": today(),
                "commit": git_commit(args.commit),
                "unit": f"us per decoder layer's linears at M={ms[0]} (CUDA graph)",
                "project": gemv_us,
                "peers": {"cublas_bf16": cublas_us},
                "ratios": {"vs_cublas_bf16": cublas_us / gemv_us},
                "copy_bandwidth_bytes_per_s": bandwidth,
                "argmax_us": am,
                "layers": rows,
                "versions": versions(),
            }
            log(f"wrote {write_result(args.out, record)}")


if __name__ == "__main__":
    main()
