"""W-prefix: the engine with prefix caching against itself without, in the same run.

    W-prefix  N requests (default 256) that share one 256-token prefix (the usual offline batch:
              one system prompt, many questions), each with its own 32-token suffix, 64 output
              tokens, greedy, EOS ignored, all submitted at once; output tokens/s, first submit
              to last completion.

Each contender (prefix caching on, then off) builds its own engine and frees it before the
next. Every repetition draws a fresh prefix, so a run never finds the previous run's prefix
cached: only sharing within the batch counts. Both contenders see the same prompt sets.

    python bench/bench_prefix.py --model 1b --out DIR
    python bench/bench_prefix.py --model tiny --device cpu --quick     # CPU smoke run
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `engine` and `bench` importable
    sys.path.insert(0, str(REPO_ROOT))

from bench.common import (  # noqa: E402
    DEFAULT_RESULTS_DIR,
    Deadline,
    card_name,
    free_device_memory,
    git_commit,
    log,
    print_table,
    repeat,
    today,
    versions,
    write_result,
)
from engine.config import EngineConfig  # noqa: E402
from engine.request import Request, SamplingParams  # noqa: E402

MODELS = ("tiny", "1b", "8b")
WORKLOAD = "W-prefix"
# Contenders in the order they run; the first is the project figure, the second its peer.
CONTENDERS = {"prefix_caching": True, "no_prefix_caching": False}
PEER = "no_prefix_caching"


@dataclass(frozen=True)
class PrefixSpec:
    num_requests: int = 256
    prefix_tokens: int = 256
    suffix_tokens: int = 32
    output_tokens: int = 64
    seed: int = 0


# --quick: the same shape with fewer requests and outputs, seconds on a CPU.
QUICK = PrefixSpec(num_requests=16, output_tokens=8)
# A run is never cut by the time budget sooner than this (the budget stops hung runs).
MIN_RUN_TIMEOUT_S = 60.0
# Default --time-budget on a GPU: one device command may run 600 s at most.
GPU_TIME_BUDGET_S = 420.0
# Seeds of the warm-up prompt sets, apart from the timed repetitions' (0, 1, ...).
WARMUP_SEED_BASE = 1000


class Interrupted(Exception):
    """SIGTERM (e.g. from `timeout`): stop, keep what was measured."""


def prompt_set(allowed: list[int], spec: PrefixSpec, seed: int) -> list[list[int]]:
    """One shared prefix and N distinct suffixes of random non-special token ids."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed * 100_003 + seed)
    pool = torch.tensor(allowed)  # [V']

    def draw(n: int) -> list[int]:
        return pool[torch.randint(len(pool), (n,), generator=gen)].tolist()

    prefix = draw(spec.prefix_tokens)
    return [prefix + draw(spec.suffix_tokens) for _ in range(spec.num_requests)]


def allowed_token_ids(checkpoint: Path) -> list[int]:
    """[0, vocab) minus the tokenizer's special ids."""
    from transformers import AutoConfig, AutoTokenizer

    vocab = int(AutoConfig.from_pretrained(checkpoint).vocab_size)
    special = set(AutoTokenizer.from_pretrained(checkpoint).all_special_ids)
    return [i for i in range(vocab) if i not in special]


def run_contender(
    args: argparse.Namespace,
    checkpoint: Path,
    spec: PrefixSpec,
    allowed: list[int],
    caching: bool,
    deadline: Deadline,
) -> dict[str, Any]:
    """Time one engine (prefix caching on or off) over warm-ups and repetitions."""
    from engine.engine import Engine

    config = EngineConfig(
        model_path=str(checkpoint), dtype=args.dtype, backend=args.backend, device=args.device,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=caching,
    )
    engine = Engine(config)
    sampling = SamplingParams(max_tokens=spec.output_tokens, temperature=0.0, ignore_eos=True)
    try:
        def one(seed: int) -> tuple[float, dict[str, Any]]:
            prompts = prompt_set(allowed, spec, seed)
            requests = [
                Request(f"p{seed}-{i}", prompt_token_ids=p, sampling=sampling)
                for i, p in enumerate(prompts)
            ]
            before = engine.stats()
            t0 = time.perf_counter()
            futures = [engine.submit(r) for r in requests]
            left = deadline.remaining()
            end = None if left == float("inf") else t0 + max(left, MIN_RUN_TIMEOUT_S)
            done = [f.result(None if end is None else max(0.0, end - time.perf_counter()))
                    for f in futures]
            seconds = time.perf_counter() - t0
            after = engine.stats()
            tokens = sum(c.completion_tokens for c in done)
            queried = after.get("prefix_cache_query_tokens", 0) - before.get(
                "prefix_cache_query_tokens", 0)
            hits = after.get("prefix_cache_hit_tokens", 0) - before.get(
                "prefix_cache_hit_tokens", 0)
            ttft = sorted(c.first_token_s for c in done)
            return tokens / seconds, {
                "seconds": seconds, "output_tokens": tokens,
                "short_outputs": sum(c.completion_tokens != spec.output_tokens for c in done),
                "prefix_cache_hit_tokens": hits, "prefill_tokens_computed": queried - hits,
                "ttft_median_s": ttft[len(ttft) // 2], "ttft_max_s": ttft[-1],
            }

        seeds = iter(range(1 << 30))
        warmups = [lambda i=i: one(WARMUP_SEED_BASE + i) for i in range(args.warmup)]
        rep = repeat(lambda: one(next(seeds)), args.reps, warmups, deadline,
                     "on" if caching else "off")
        return {**rep.summary(), "engine_stats": engine.stats()}
    finally:
        engine.shutdown()


def build_record(base: dict[str, Any], results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    ok = {k: v["median"] for k, v in results.items() if "median" in v}
    project = ok.get("prefix_caching")
    peers = {k: ok[k] for k in (PEER,) if k in ok}
    ratios = {f"vs_{k}": project / v for k, v in peers.items() if project is not None and v > 0}
    return {
        **base, "unit": "tokens/s", "project": project, "peers": peers, "ratios": ratios,
        "errors": {k: v["error"] for k, v in results.items() if "error" in v},
        "skipped": {k: v["skipped"] for k, v in results.items() if "skipped" in v},
        "details": results,
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1b", choices=MODELS)
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR, help="JSON directory")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/tideq-bench-models"),
                   help="where checkpoints are built (reused when present)")
    p.add_argument("--backend", choices=["native", "auto"], default="native")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--num-requests", type=int, default=None, help="default 256 (16 --quick)")
    p.add_argument("--prefix-tokens", type=int, default=None, help="default 256")
    p.add_argument("--suffix-tokens", type=int, default=None, help="default 32")
    p.add_argument("--output-tokens", type=int, default=None, help="default 64 (8 --quick)")
    p.add_argument("--reps", type=int, default=None, help="timed runs each (3; 2 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs before timing")
    p.add_argument("--quick", action="store_true", help="small sizes for a CPU smoke run")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help=f"seconds for the whole run (default {GPU_TIME_BUDGET_S:.0f} on a GPU,"
                        " none on CPU; 0: none)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--commit", default=None, help="commit to record (default: git / $TIDEQ_COMMIT)")
    args = p.parse_args(argv)
    base = QUICK if args.quick else PrefixSpec()
    args.spec = PrefixSpec(
        num_requests=args.num_requests or base.num_requests,
        prefix_tokens=args.prefix_tokens or base.prefix_tokens,
        suffix_tokens=args.suffix_tokens or base.suffix_tokens,
        output_tokens=args.output_tokens or base.output_tokens,
    )
    need = args.spec.prefix_tokens + args.spec.suffix_tokens + args.spec.output_tokens
    if need > args.max_model_len:
        p.error(f"prompt + output ({need} tokens) exceed --max-model-len {args.max_model_len}")
    args.reps = args.reps or (2 if args.quick else 3)
    if args.time_budget is None and args.device.startswith("cuda"):
        args.time_budget = GPU_TIME_BUDGET_S
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers.utils import logging as hf_logging

    from engine.random_checkpoint import ensure_checkpoint

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("--device cuda but torch sees no CUDA device (use --device cpu)", file=sys.stderr)
        return 2
    hf_logging.disable_progress_bar()

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    deadline = Deadline(args.time_budget)
    spec: PrefixSpec = args.spec
    card = card_name(args.device)
    base: dict[str, Any] = {
        "workload": WORKLOAD, "model": args.model, "card": card,
        "gpus": 1 if args.device.startswith("cuda") else 0, "date": today(),
        "commit": git_commit(args.commit), "backend": args.backend,
        "reps": {"project": args.reps, "peers": args.reps, "warmup": args.warmup},
        **versions(),
        "settings": {
            "device": args.device, "dtype": args.dtype, "quick": args.quick,
            "max_num_seqs": args.max_num_seqs,
            "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_model_len": args.max_model_len, "time_budget_s": args.time_budget,
            "greedy": True, "ignore_eos": True, "workload": asdict(spec),
        },
    }
    log(f"card {card}; model {args.model}; {spec}; commit {base['commit']}")
    path = args.model_dir / f"llama-{args.model}"
    ensure_checkpoint(path, arch="llama", shape=args.model, dtype=args.dtype, seed=0,
                      device=args.device)
    free_device_memory(args.device)
    allowed = allowed_token_ids(path)

    results: dict[str, dict[str, Any]] = {}
    record = build_record(base, results)
    try:
        for name, caching in CONTENDERS.items():
            if deadline.expired():
                results[name] = {"skipped": f"time budget {args.time_budget}s spent"}
            else:
                log(f"{name}: start")
                try:
                    results[name] = run_contender(args, path, spec, allowed, caching, deadline)
                    log(f"{name}: median {results[name]['median']:,.1f} tokens/s")
                except Interrupted:
                    results[name] = {"skipped": "interrupted"}
                    raise
                except Exception as err:  # a failed contender is recorded; the run goes on
                    traceback.print_exc()
                    results[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
                free_device_memory(args.device)
            record = build_record(base, results)
            write_result(args.out, record)
    except (Interrupted, KeyboardInterrupt) as err:
        log(f"interrupted ({err}); writing what was measured")
        for name in CONTENDERS:
            results.setdefault(name, {"skipped": "interrupted"})
        record = build_record(base, results)
        write_result(args.out, record)
        print_table([record])
        return 130
    print_table([record])
    log(f"wrote {args.out}")
    return 0 if not record["errors"] else 1


if __name__ == "__main__":
    sys.exit(main())
