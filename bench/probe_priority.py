"""W-priority at the engine alone: how long `high` requests take while the engine is kept full
of `low` ones, under several scheduler settings, with the steps profiled.

It isolates the scheduler from the queue path: a feeder keeps `--in-flight` low requests
outstanding (what a worker's admission gate holds), each low request a 40-470 token prompt and
128 greedy tokens; after a lead, `--high` high requests (128-token prompt, 128 tokens) arrive
one every 200 ms. Reported per setting: high latency p50/p99 against the same requests on the
idle engine, low tokens/s while the high ones ran, and the steps of that window by kind (graph
decode, eager mixed) with their seqs, tokens and time.

    source .devbundle/enter.sh && python3 bench/probe_priority.py --out $OUT
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# name -> EngineConfig overrides on top of the shipped gpu-1x deployment's engine settings
# (strategy even); `priority` reserves a quarter of the 256 slots, as the deployment does.
RESERVED = {"reserved_high_slots": 64}
# Settings by name; besides these, `lane-S-T` is any lane: S low sequences and T low tokens a
# step while high work is present.
SETTINGS: dict[str, dict[str, Any]] = {
    "even": {},
    "priority": RESERVED,
    "lane-decode-only": {**RESERVED, "low_tokens_while_high": 300},
}
DEFAULT_SETTINGS = ("even", "priority", "lane-64-512", "lane-decode-only", "lane-128-640")


def setting(name: str) -> dict[str, Any]:
    """The EngineConfig overrides of a setting name: one of SETTINGS, or lane-S-T."""
    if name in SETTINGS:
        return SETTINGS[name]
    if name.startswith("lane-") and name[5:6].isdigit():
        seqs, tokens = name.split("-")[1:3]
        return {**RESERVED, "low_seqs_while_high": int(seqs), "low_tokens_while_high": int(tokens)}
    raise SystemExit(f"unknown setting {name!r}: one of {', '.join(SETTINGS)} or lane-S-T")


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def profile_eager_steps(runner: Any) -> Any:
    """Python's profiler around every eager step's forward (the host side of a mixed step)."""
    import cProfile

    prof = cProfile.Profile()
    eager = runner._eager

    def profiled(out: Any) -> Any:
        prof.enable()
        try:
            return eager(out)
        finally:
            prof.disable()

    runner._eager = profiled
    return prof


def print_host_profile(prof: Any) -> None:
    import io
    import pstats

    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(28)
    body = text.getvalue()
    print(body[body.find("ncalls"):], flush=True)


def trace_flood(seconds: float) -> dict[str, Any]:
    """Host and device time by operator while the flood runs (torch.profiler; the core runs
    in a thread of this process)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        time.sleep(seconds)
    rows = prof.key_averages()
    cpu = sorted(rows, key=lambda e: -e.self_cpu_time_total)[:25]
    dev = sorted(rows, key=lambda e: -getattr(e, "self_device_time_total", 0.0))[:12]
    out = {"cpu": [{"name": e.key[:80], "calls": e.count, "self_cpu_ms": e.self_cpu_time_total
                    / 1e3} for e in cpu],
           "device": [{"name": e.key[:80], "calls": e.count,
                       "self_device_ms": getattr(e, "self_device_time_total", 0.0) / 1e3}
                      for e in dev]}
    for row in out["cpu"]:
        print(f"      cpu {row['self_cpu_ms']:9.1f} ms x{row['calls']:<6} {row['name']}")
    for row in out["device"]:
        print(f"      dev {row['self_device_ms']:9.1f} ms x{row['calls']:<6} {row['name']}")
    return out


def run_setting(name: str, base: Any, overrides: dict[str, Any], args: argparse.Namespace,
                vocab: int) -> dict[str, Any]:
    from dataclasses import replace

    from engine.engine import Engine
    from engine.request import Request, SamplingParams

    config = replace(base, **overrides)
    rng = random.Random(0)
    sampling = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)

    def prompt(n: int) -> list[int]:
        return [rng.randrange(100, vocab - 1) for _ in range(n)]

    engine = Engine(config)
    counter = iter(range(1 << 30))
    try:
        def low() -> Request:
            return Request(f"l{next(counter)}", prompt_token_ids=prompt(rng.randint(40, 470)),
                           sampling=sampling, priority="low")

        def high() -> Request:
            return Request(f"h{next(counter)}", prompt_token_ids=prompt(128), sampling=sampling,
                           priority="high")

        for f in [engine.submit(low()) for _ in range(512)]:  # warm-up
            f.result()
        idle = []
        for _ in range(10):
            t0 = time.perf_counter()
            engine.submit(high()).result()
            idle.append(time.perf_counter() - t0)

        done_low: list[tuple[float, int]] = []
        stop = threading.Event()
        lock = threading.Lock()

        def on_done(fut: Any) -> None:
            if fut.exception() is not None:  # failed at shutdown
                return
            with lock:
                done_low.append((time.perf_counter(), len(fut.result().token_ids)))
            if not stop.is_set():
                engine.submit(low()).add_done_callback(on_done)

        for _ in range(args.in_flight):
            engine.submit(low()).add_done_callback(on_done)
        time.sleep(args.lead_s)
        runner = engine.backend.runner
        steps: list[dict[str, Any]] = []
        runner.profile = steps
        eager_profile = profile_eager_steps(runner) if args.cprofile_eager else None
        lat: list[float] = []
        futures = []
        t_start = time.perf_counter()
        for i in range(args.high):
            time.sleep(max(0.0, t_start + i * 0.2 - time.perf_counter()))
            t0 = time.perf_counter()
            fut = engine.submit(high())
            # Resolved on the engine's receiver thread: the time the result is ready.
            fut.add_done_callback(lambda f, t0=t0: lat.append(time.perf_counter() - t0))
            futures.append(fut)
        for fut in futures:
            fut.result()
        t_end = time.perf_counter()
        runner.profile = None
        if eager_profile is not None:
            del runner._eager  # the instance attribute; the class's method shows again
            print_host_profile(eager_profile)
        out_trace = trace_flood(args.trace) if args.trace else None
        stop.set()
        with lock:
            window = [(t, n) for t, n in done_low if t_start <= t <= t_end]
        low_tps = sum(n for _, n in window) / (t_end - t_start)
        by_kind: dict[str, Any] = {}
        for kind in sorted({s["kind"] for s in steps}):
            sel = [s for s in steps if s["kind"] == kind]
            by_kind[kind] = {
                "steps": len(sel), "mean_seqs": statistics.mean(s["seqs"] for s in sel),
                "mean_tokens": statistics.mean(s["tokens"] for s in sel),
                "host_ms": 1e3 * statistics.mean(s["host_s"] for s in sel),
                "wait_ms": 1e3 * statistics.mean(s["wait_s"] for s in sel),
            }
        out = {"setting": name, "overrides": overrides,
               "idle_p50_s": statistics.median(idle), "high_p50_s": statistics.median(lat),
               "high_p99_s": pct(lat, 0.99), "low_tokens_per_s": low_tps,
               "window_s": t_end - t_start, "steps_in_window": len(steps),
               "ms_per_step": 1e3 * (t_end - t_start) / max(1, len(steps)), "by_kind": by_kind}
        out["high_p99_vs_idle"] = out["high_p99_s"] / out["idle_p50_s"]
        if out_trace is not None:
            out["trace"] = out_trace
        # Drain what is left before the next setting.
        time.sleep(0.1)
        return out
    finally:
        engine.shutdown()
        close = getattr(engine.backend, "close", None)
        if close is not None:
            close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/gpu-1x.yaml")
    parser.add_argument("--model", default="1b")
    parser.add_argument("--model-dir", type=Path, default=Path("/tmp/tideq-bench-models"))
    parser.add_argument("--settings", default=",".join(DEFAULT_SETTINGS))
    parser.add_argument("--in-flight", type=int, default=512)
    parser.add_argument("--high", type=int, default=30)
    parser.add_argument("--lead-s", type=float, default=3.0)
    parser.add_argument("--trace", type=float, default=0.0,
                        help="seconds of torch.profiler over the flood after the window")
    parser.add_argument("--cprofile-eager", action="store_true",
                        help="Python's profiler over the eager steps of the window")
    parser.add_argument("--out", default="bench/results")
    args = parser.parse_args()

    import torch

    from bench.common import deployment_engine_config, gpu_checkpoint

    path = gpu_checkpoint(args.model_dir, args.model)
    base = deployment_engine_config(args.config, path)
    base.core = "thread"  # the runner's per-step profile is read in this process
    base.enable_prefix_caching = False
    from transformers import AutoConfig

    vocab = AutoConfig.from_pretrained(path).vocab_size
    results = []
    for name in args.settings.split(","):
        r = run_setting(name, base, setting(name), args, vocab)
        results.append(r)
        print(f"{name}: high p50 {r['high_p50_s']:.3f}s p99 {r['high_p99_s']:.3f}s (idle p50 "
              f"{r['idle_p50_s']:.3f}s, p99/idle {r['high_p99_vs_idle']:.1f}x); low "
              f"{r['low_tokens_per_s']:,.0f} tok/s; {r['ms_per_step']:.2f} ms/step", flush=True)
        for kind, v in r["by_kind"].items():
            print(f"   {kind}: {v['steps']} steps, seqs {v['mean_seqs']:.0f}, tokens "
                  f"{v['mean_tokens']:.0f}, host {v['host_ms']:.2f} ms, wait {v['wait_ms']:.2f}"
                  " ms", flush=True)
        gc.collect()  # the engine of a thread core goes with its last reference
        torch.cuda.empty_cache()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"probe_priority_{args.model}.json").write_text(json.dumps(
        {"config": args.config, "base": {k: getattr(base, k) for k in (
            "max_num_seqs", "max_num_batched_tokens", "reserved_high_slots")},
         "in_flight": args.in_flight, "results": results}, indent=1))


if __name__ == "__main__":
    main()
