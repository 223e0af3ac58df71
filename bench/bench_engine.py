"""The engine alone against Hugging Face transformers, on one card (BENCHMARKS.md):

    W-throughput  512 requests, prompts of 32-512 random tokens, 128 output tokens each, all
                  submitted at once; output tokens/s. Peers: `generate()` in static batches of
                  64 and 256, continuous batching `generate_batch()`.
    W-latency     one request, 128-token prompt, 256 output tokens; decode tokens/s (time to
                  first token excluded) and its fraction of the card's bandwidth floor. Peers:
                  `generate()` with a dynamic cache and with a static (compiled) cache.
    W-tp          W-latency of the `tp2` variant (tensor parallel over 2 GPUs) against the
                  1-GPU engine of the same run: vs_1gpu and the 2-GPU floor.

The project runs as one or more variants (--variants): the default engine (`fast`), and ones
that change one thing (`thread`: the core in a thread of this process; `tp2` / `layer2`: the
model sharded over 2 devices; `eager`, `int8`).

Greedy, EOS ignored. Order of work, so that a time budget loses the least: every project
figure first, then the peer each ratio needs, then the other peers; each JSON file is
rewritten as soon as a contender finishes.

    python bench/bench_engine.py --workload all --model 1b,8b --out DIR
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run as a script: make `engine` and `bench` importable
    sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    DEFAULT_RESULTS_DIR,
    Deadline,
    Repeated,
    card_name,
    free_device_memory,
    git_commit,
    log,
    measure_bandwidth,
    print_table,
    repeat,
    synchronize,
    today,
    versions,
    write_result,
)
from engine.config import EngineConfig  # noqa: E402
from engine.request import Request, SamplingParams  # noqa: E402

MODELS = ("tiny", "1b", "8b")
WORKLOAD_IDS = {"throughput": "W-throughput", "latency": "W-latency"}
# BENCHMARKS.md defines W-throughput on `1b` only (its HF peers on `8b` would take most of
# a device call); `tiny` is for CPU smoke runs. --all-pairs lifts this.
DEFINED_ON = {"throughput": ("tiny", "1b"), "latency": ("tiny", "1b", "8b")}
# Peers in the order they run: the one the headline ratio needs first.
PEERS = {
    "throughput": ("hf_generate_batch", "hf_generate_static256", "hf_generate_static64"),
    "latency": ("hf_static_cache", "hf_generate"),
}
RATIO_PEER = {"throughput": "hf_generate_batch", "latency": "hf_static_cache"}
# --peers names that stand for several peers.
PEER_ALIASES = {
    "hf_generate": ("hf_generate_static64", "hf_generate_static256", "hf_generate"),
}
STATIC_BATCH = {"hf_generate_static64": 64, "hf_generate_static256": 256}


@dataclass(frozen=True)
class ThroughputSpec:
    num_requests: int = 512
    prompt_min: int = 32
    prompt_max: int = 512  # inclusive
    output_tokens: int = 128
    seed: int = 0
    # The HF peers' warm-up: the first requests of the workload, few output tokens (enough to
    # load kernels and the allocator; each peer still meets new shapes in its timed runs).
    warmup_requests: int = 64
    warmup_tokens: int = 16


@dataclass(frozen=True)
class LatencySpec:
    prompt_tokens: int = 128
    output_tokens: int = 256
    seed: int = 0


# A project run is never cut by the time budget sooner than this (the budget stops hung runs).
MIN_RUN_TIMEOUT_S = 60.0
# Default --time-budget on a GPU: one device command may run 600 s at most; the last
# contender started may overrun the budget by one warm-up + one run (~1 min for the slowest).
GPU_TIME_BUDGET_S = 420.0

# engine/random_checkpoint.py writes this file after the weights and the tokenizer: a
# checkpoint folder without it was cut while being written.
BUILD_MARKER = "tideq_build.json"

# --quick: a CPU smoke run of the same code paths in seconds.
QUICK_THROUGHPUT = ThroughputSpec(num_requests=8, prompt_min=8, prompt_max=32, output_tokens=8,
                                  warmup_requests=4, warmup_tokens=4)
QUICK_LATENCY = LatencySpec(prompt_tokens=16, output_tokens=8)
# Bandwidth copy size: 1 GiB (far past any cache) on a GPU; small on a CPU smoke run.
BANDWIDTH_BYTES = 1 << 30
QUICK_BANDWIDTH_BYTES = 64 << 20
# generate_batch's KV cache on a CPU run: enough blocks (of its default size) for the quick
# workload, instead of a cache sized from host memory.
CPU_CB_BLOCKS = 16
CPU_CB_BATCH_TOKENS = 512


@dataclass
class Pair:
    """One workload on one model: its inputs and whatever has been measured so far."""

    workload: str  # "throughput" | "latency"
    model: str
    checkpoint: Path
    peers: list[str]
    # The project's variants, headline first (its figure is "project").
    variants: list[str] = field(default_factory=lambda: ["fast"])
    # Per variant: GPUs its engine uses (0 on a CPU run) and its engine settings (the JSON's).
    gpus: dict[str, int] = field(default_factory=dict)
    variant_settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    prompts: list[list[int]] = field(default_factory=list)
    pad_id: int = 0
    params: int = 0
    param_bytes: int = 0
    # name -> {"median": ...} | {"error": "..."} | {"skipped": "..."}
    results: dict[str, dict[str, Any]] = field(default_factory=dict)


class Interrupted(Exception):
    """SIGTERM (e.g. from `timeout`): stop, keep what was measured."""


# --- inputs ----------------------------------------------------------------------------------
def allowed_token_ids(checkpoint: Path) -> tuple[torch.Tensor, int, int]:
    """Token ids a random prompt may use ([0, vocab) minus special ids), the pad id, vocab."""
    from transformers import AutoConfig, AutoTokenizer

    vocab = int(AutoConfig.from_pretrained(checkpoint).vocab_size)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    keep = torch.ones(vocab, dtype=torch.bool)  # [V]
    special = [i for i in tokenizer.all_special_ids if 0 <= i < vocab]
    keep[special] = False
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return keep.nonzero().squeeze(1), int(pad), vocab  # [V']


def random_prompts(
    allowed: torch.Tensor, lengths: list[int], seed: int
) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [
        allowed[torch.randint(len(allowed), (n,), generator=gen)].tolist() for n in lengths
    ]


def throughput_prompts(allowed: torch.Tensor, spec: ThroughputSpec) -> list[list[int]]:
    gen = torch.Generator().manual_seed(spec.seed)
    lengths = torch.randint(
        spec.prompt_min, spec.prompt_max + 1, (spec.num_requests,), generator=gen
    ).tolist()
    return random_prompts(allowed, lengths, spec.seed + 1)


def count_params(checkpoint: Path) -> int:
    """Parameters of the model as built (tied embeddings once), counted on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(checkpoint))
    return sum(p.numel() for p in model.parameters())


# --- the project -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    """One way of running the project (--variants): EngineConfig fields that differ from the
    default engine."""

    about: str
    enforce_eager: bool = False
    int8: bool = False
    core: str = "process"  # EngineConfig.core
    shard_strategy: str = "none"  # EngineConfig.shard_strategy
    ranks: int = 1  # EngineConfig.group_size: one process and one device per rank
    custom_all_reduce: bool = True  # EngineConfig.custom_all_reduce

    @property
    def parallel_reads(self) -> int:
        """Ranks that read their share of the weights at the same time in a decode step:
        all of a tensor group; one at a time in a layer split (each holds its layers whole
        and the ranks take turns)."""
        return self.ranks if self.shard_strategy == "tensor" else 1


# `fast` is the default engine: Triton attention, fused layers, CUDA graphs for decode steps on
# a GPU, the core in a process of its own. The others change one thing.
VARIANTS: dict[str, Variant] = {
    "fast": Variant("the default engine"),
    "eager": Variant("enforce_eager: PyTorch attention, no graphs or fused layers",
                     enforce_eager=True),
    "int8": Variant("fast with weight-only int8 linear layers", int8=True),
    "thread": Variant("fast with the core in a thread of the bench process (core='thread')",
                      core="thread"),
    "tp2": Variant("fast, tensor parallel over 2 devices (shard_strategy='tensor')",
                   shard_strategy="tensor", ranks=2),
    "tp4": Variant("fast, tensor parallel over 4 devices (shard_strategy='tensor')",
                   shard_strategy="tensor", ranks=4),
    "tp8": Variant("fast, tensor parallel over 8 devices (shard_strategy='tensor')",
                   shard_strategy="tensor", ranks=8),
    "tp2nccl": Variant("tp2 with every all-reduce on NCCL (custom_all_reduce=False)",
                       shard_strategy="tensor", ranks=2, custom_all_reduce=False),
    "layer2": Variant("layers split over 2 devices (shard_strategy='layer'; runs eagerly)",
                      shard_strategy="layer", ranks=2),
}
# The variant whose W-latency figure is W-tp's project, against the headline (1-GPU) figure;
# other tensor-parallel variants timed in the same run get a W-tp record of their own (`gpus`
# tells them apart).
TP_VARIANT = "tp2"


def variant_gpus(args: argparse.Namespace, variant: str) -> int:
    """GPUs a variant's engine uses: its ranks on a GPU run, none on a CPU run."""
    return VARIANTS[variant].ranks if args.device.startswith("cuda") else 0


def variant_unavailable(args: argparse.Namespace, variant: str) -> str | None:
    """Why a variant cannot run here (it is then skipped, with this reason), or None."""
    spec = VARIANTS[variant]
    if spec.ranks > 1 and args.backend == "hf":
        return f"{variant}: the hf backend cannot shard a model (use --backend native)"
    if spec.ranks > 1 and args.device.startswith("cuda"):
        visible = torch.cuda.device_count()
        if visible < spec.ranks:
            return f"{variant} needs {spec.ranks} GPUs, {visible} visible"
    return None


def engine_config(
    args: argparse.Namespace, checkpoint: Path, variant: str = "fast"
) -> EngineConfig:
    spec = VARIANTS[variant]
    return EngineConfig(
        model_path=str(checkpoint), dtype="int8" if spec.int8 else args.dtype,
        backend=args.backend, device=args.device, enforce_eager=spec.enforce_eager,
        # Every repetition sends the same prompts: a prefix cache would skip their prefill
        # from the second run on, which the HF peers cannot do; BENCHMARKS.md times fresh work.
        enable_prefix_caching=False,
        max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
        max_num_batched_tokens=args.max_num_batched_tokens,
        core=spec.core,  # type: ignore[arg-type]
        shard_strategy=spec.shard_strategy,  # type: ignore[arg-type]
        group_size=spec.ranks,
        distributed_backend=distributed_backend(args),  # type: ignore[arg-type]
        custom_all_reduce=spec.custom_all_reduce,
    )


def variant_settings(args: argparse.Namespace, variant: str) -> dict[str, Any]:
    """The engine settings a variant changes, as its JSON records them (read from the spec:
    an EngineConfig is built, and may fail, only when the variant runs)."""
    spec = VARIANTS[variant]
    return {"core": spec.core, "shard_strategy": spec.shard_strategy, "group_size": spec.ranks,
            "enforce_eager": spec.enforce_eager, "dtype": "int8" if spec.int8 else args.dtype,
            "distributed_backend": distributed_backend(args) if spec.ranks > 1 else None,
            "custom_all_reduce": spec.custom_all_reduce}


def distributed_backend(args: argparse.Namespace) -> str:
    # NCCL between GPUs; gloo on a CPU run (the CPU smoke test covers the sharded paths).
    return "nccl" if args.device.startswith("cuda") else "gloo"


@contextmanager
def running_engine(args: argparse.Namespace, checkpoint: Path, variant: str) -> Iterator[Any]:
    """The engine of one variant, shut down whole on exit so the next contender has the cards
    to itself: a process core's rank processes have exited (Engine.shutdown joins them, and
    kills what has not left), and a core in this process has released its captured graphs
    (the rest of its memory goes with the engine object: the caller frees the device memory
    once its frame is gone, see free_device_memory after each contender)."""
    from engine.engine import Engine

    engine = Engine(engine_config(args, checkpoint, variant))
    try:
        yield engine
    finally:
        engine.shutdown()
        close = getattr(engine.backend, "close", None)  # a core in a thread: its backend
        if close is not None:
            try:
                close()
            except Exception as err:  # cleanup is best effort; the memory goes with gc
                log(f"  closing the {variant} backend failed: {err}")


def result_name(variant: str, main: str) -> str:
    """The results key of a variant: "project" for the headline one."""
    return "project" if variant == main else f"project_{variant}"


def profiled_run(engine: Any, run: Callable[[], tuple[float, dict[str, Any]]]) -> dict[str, Any]:
    """One more run with the runner's per-step timings on (kept out of the timed runs: the
    CUDA events cost a little): where a step's time goes, host work or the device."""
    backend = getattr(engine, "backend", None)
    runner = getattr(backend, "runner", None)
    if runner is None:
        return {"error": "the backend has no runner to profile"}
    steps: list[dict[str, Any]] = []
    walls: list[float] = []
    step = backend.step

    def timed_step() -> Any:
        t0 = time.perf_counter()
        try:
            return step()
        finally:
            walls.append(time.perf_counter() - t0)

    runner.profile = steps
    backend.step = timed_step
    try:
        value, _ = run()
    finally:
        runner.profile = None
        del backend.step  # the instance attribute; the class's method shows again
    out: dict[str, Any] = {"value": value, "steps": len(steps),
                           "step_wall_s": sum(walls), "execute_s": 0.0, "by_kind": {}}
    for kind in sorted({s["kind"] for s in steps}):
        sel = [s for s in steps if s["kind"] == kind]
        gpu = [s["gpu_s"] for s in sel if s["gpu_s"] is not None]
        host = sum(s["host_s"] for s in sel)
        wait = sum(s["wait_s"] for s in sel)
        out["execute_s"] += host + wait
        out["by_kind"][kind] = {
            "steps": len(sel), "tokens": sum(s["tokens"] for s in sel),
            "mean_seqs": sum(s["seqs"] for s in sel) / len(sel),
            "host_s": host, "wait_s": wait, "gpu_s": sum(gpu) if gpu else None,
            "host_ms_per_step": 1e3 * host / len(sel),
            "wait_ms_per_step": 1e3 * wait / len(sel),
            "gpu_ms_per_step": 1e3 * sum(gpu) / len(gpu) if gpu else None,
        }
    # Outside execute: scheduling, postprocessing, the engine loop's own work.
    out["outside_execute_s"] = out["step_wall_s"] - out["execute_s"]
    log("  profile: " + "; ".join(
        f"{k}: {v['steps']} steps, host {v['host_ms_per_step']:.2f} ms, wait "
        f"{v['wait_ms_per_step']:.2f} ms, gpu "
        + (f"{v['gpu_ms_per_step']:.2f} ms" if v["gpu_ms_per_step"] is not None else "-")
        for k, v in out["by_kind"].items())
        + f"; outside execute {out['outside_execute_s']:.2f}s of {out['step_wall_s']:.2f}s")
    return out


# Kernels listed in a kernel profile: enough to see where a decode step's device time goes.
TOP_KERNELS = 20


def kernel_profile(run: Callable[[], tuple[float, dict[str, Any]]]) -> dict[str, Any]:
    """One more run under torch.profiler: device time per kernel (graph replays included),
    so a missed target can be explained kernel by kernel, and the share of the wall time the
    device spent in kernels at all (the rest is launch gaps and host time)."""
    from torch.profiler import ProfilerActivity, profile

    if not torch.cuda.is_available():
        return {"error": "no CUDA device"}
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        value, detail = run()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    kernels = []
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", None)
        if device_us is None:
            device_us = getattr(e, "self_cuda_time_total", 0.0)
        if device_us and getattr(e, "device_type", None) is not None and \
                str(e.device_type).endswith("CUDA"):
            kernels.append({"name": e.key[:120], "calls": e.count, "device_ms": device_us / 1e3})
    kernels.sort(key=lambda k: -k["device_ms"])
    total = sum(k["device_ms"] for k in kernels)
    out = {"value": value, "wall_ms": wall * 1e3, "kernel_ms": total,
           "kernel_share_of_wall": total / (wall * 1e3) if wall else None,
           "top": kernels[:TOP_KERNELS], "detail": detail}
    log(f"  kernels: {total:.1f} ms of device time in {wall * 1e3:.1f} ms wall; top: "
        + "; ".join(f"{k['name'][:40]} {k['device_ms']:.2f} ms x{k['calls']}"
                    for k in kernels[:6]))
    return out


def greedy(n: int) -> SamplingParams:
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def wait_all(engine: Any, requests: list[Request], deadline: Deadline) -> list[Any]:
    """engine.generate, but a run that outlives the time budget (a hung engine) fails with
    TimeoutError instead of holding the device call until it is killed."""
    futures = [engine.submit(r) for r in requests]
    left = deadline.remaining()
    timeout = None if left == float("inf") else max(left, MIN_RUN_TIMEOUT_S)
    end = time.monotonic() + timeout if timeout is not None else None
    return [f.result(None if end is None else max(0.0, end - time.monotonic())) for f in futures]


def project_throughput(
    args: argparse.Namespace, pair: Pair, spec: ThroughputSpec, deadline: Deadline,
    variant: str = "fast",
) -> dict[str, Any]:
    t_start = time.perf_counter()
    with running_engine(args, pair.checkpoint, variant) as engine:
        startup_s = time.perf_counter() - t_start
        log(f"  project {variant}: engine up in {startup_s:.1f}s")
        counter = iter(range(1 << 30))

        def run() -> tuple[float, dict[str, Any]]:
            tag = next(counter)
            requests = [
                Request(f"t{tag}-{i}", prompt_token_ids=p, sampling=greedy(spec.output_tokens))
                for i, p in enumerate(pair.prompts)
            ]
            t0 = time.perf_counter()
            done = wait_all(engine, requests, deadline)
            seconds = time.perf_counter() - t0
            tokens = sum(c.completion_tokens for c in done)
            short = sum(c.completion_tokens != spec.output_tokens for c in done)
            return tokens / seconds, {"seconds": seconds, "output_tokens": tokens,
                                      "short_outputs": short}

        # Warm-up: the whole workload once (the engine may capture graphs per batch size).
        rep = repeat(run, args.reps, [run] * args.warmup, deadline, f"project {variant}")
        extra = {"profile": profiled_run(engine, run)} if args.profile and variant == "fast" else {}
        return {**rep.summary(), "startup_s": startup_s, "engine_stats": engine.stats(),
                **extra}


def project_latency(
    args: argparse.Namespace, pair: Pair, spec: LatencySpec, deadline: Deadline,
    variant: str = "fast",
) -> dict[str, Any]:
    t_start = time.perf_counter()
    with running_engine(args, pair.checkpoint, variant) as engine:
        startup_s = time.perf_counter() - t_start
        log(f"  project {variant}: engine up in {startup_s:.1f}s")
        counter = iter(range(1 << 30))

        def run() -> tuple[float, dict[str, Any]]:
            req = Request(f"l{next(counter)}", prompt_token_ids=pair.prompts[0],
                          sampling=greedy(spec.output_tokens))
            c = wait_all(engine, [req], deadline)[0]
            decode_s = c.total_s - c.first_token_s
            return (c.completion_tokens - 1) / decode_s, {
                "ttft_s": c.first_token_s, "total_s": c.total_s,
                "output_tokens": c.completion_tokens,
            }

        rep = repeat(run, args.reps, [run] * max(2, args.warmup), deadline,
                     f"project {variant}")
        extra: dict[str, Any] = {}
        if args.profile and variant == "fast":
            extra = {"profile": profiled_run(engine, run), "kernels": kernel_profile(run)}
        return {**rep.summary(), "startup_s": startup_s, "engine_stats": engine.stats(),
                **extra}


# --- Hugging Face peers ----------------------------------------------------------------------
@contextmanager
def hf_model(args: argparse.Namespace, checkpoint: Path) -> Iterator[Any]:
    """The checkpoint loaded the way a plain transformers worker would; freed on exit so the
    next contender has the card to itself."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=getattr(torch, args.dtype))
    model = model.to(args.device).eval()
    try:
        yield model
    finally:
        if hasattr(model, "destroy_cached_continuous_batching_manager"):
            model.destroy_cached_continuous_batching_manager()
        del model
        free_device_memory(args.device)


def left_padded(
    prompts: list[list[int]], pad_id: int, device: str
) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)  # [B, T]
    mask = torch.zeros((len(prompts), width), dtype=torch.long)  # [B, T]
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids.to(device), mask.to(device)


def hf_static_batches(
    model: Any, prompts: list[list[int]], batch: int, n_out: int, pad_id: int, device: str
) -> tuple[float, dict[str, Any]]:
    """generate() over consecutive static batches, as a worker that batches jobs would."""
    synchronize(device)
    t0 = time.perf_counter()
    tokens = 0
    for start in range(0, len(prompts), batch):
        ids, mask = left_padded(prompts[start : start + batch], pad_id, device)
        out = model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=n_out, min_new_tokens=n_out,
            do_sample=False, pad_token_id=pad_id,
        )  # [B, T + n_out]
        tokens += (out.shape[1] - ids.shape[1]) * out.shape[0]
    synchronize(device)
    seconds = time.perf_counter() - t0
    return tokens / seconds, {"seconds": seconds, "output_tokens": tokens}


def hf_generate_batch(
    model: Any, prompts: list[list[int]], n_out: int, device: str
) -> tuple[float, dict[str, Any]]:
    """transformers' continuous batching with its defaults. It logs and swallows its own
    failures, so a short or failed result is turned into an error here."""
    from transformers import GenerationConfig

    # eos_token_id -1: no EOS, every request decodes n_out tokens.
    config = GenerationConfig(max_new_tokens=n_out, do_sample=False, eos_token_id=-1)
    kwargs: dict[str, Any] = {}
    if not device.startswith("cuda"):
        # On a CPU its defaults size the KV cache from host memory (tens of seconds and many
        # GB); the GPU keeps the defaults, as BENCHMARKS.md measured them.
        from transformers import ContinuousBatchingConfig

        kwargs["continuous_batching_config"] = ContinuousBatchingConfig(
            num_blocks=CPU_CB_BLOCKS, max_batch_tokens=CPU_CB_BATCH_TOKENS
        )
    synchronize(device)
    t0 = time.perf_counter()
    results = model.generate_batch(inputs=prompts, generation_config=config, **kwargs)
    synchronize(device)
    seconds = time.perf_counter() - t0
    outputs = list(results.values())
    failed = [o.error for o in outputs if getattr(o, "error", None)]
    if len(outputs) != len(prompts) or failed:
        raise RuntimeError(
            f"generate_batch returned {len(outputs)}/{len(prompts)} results,"
            f" {len(failed)} failed{': ' + str(failed[0]) if failed else ''}"
        )
    tokens = sum(len(o.generated_tokens) for o in outputs)
    short = sum(len(o.generated_tokens) != n_out for o in outputs)
    return tokens / seconds, {"seconds": seconds, "output_tokens": tokens, "short_outputs": short}


def hf_latency_run(
    model: Any, prompt: list[int], n_out: int, pad_id: int, device: str, static: bool
) -> tuple[float, dict[str, Any]]:
    """One generate() call; decode tokens/s from the first token's arrival to the end."""
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenClock(BaseStreamer):  # type: ignore[misc]
        """generate() puts the prompt first, then each new token; stamp the first token."""

        def __init__(self) -> None:
            self.puts = 0
            self.first: float | None = None

        def put(self, value: Any) -> None:
            self.puts += 1
            if self.puts == 2:
                synchronize(device)
                self.first = time.perf_counter()

        def end(self) -> None:
            pass

    ids = torch.tensor([prompt], device=device)  # [1, T]
    extra: dict[str, Any] = {"cache_implementation": "static"} if static else {}
    clock = FirstTokenClock()
    synchronize(device)
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_out,
        min_new_tokens=n_out, do_sample=False, pad_token_id=pad_id, streamer=clock, **extra,
    )  # [1, T + n_out]
    synchronize(device)
    t_end = time.perf_counter()
    n = out.shape[1] - ids.shape[1]
    first = clock.first if clock.first is not None else t0
    return (n - 1) / (t_end - first), {
        "ttft_s": first - t0, "total_s": t_end - t0, "output_tokens": n,
    }


def run_peer(
    name: str, model: Any, args: argparse.Namespace, pair: Pair, spec: Any, deadline: Deadline
) -> dict[str, Any]:
    dev = args.device
    if pair.workload == "throughput":
        warm_prompts = pair.prompts[: spec.warmup_requests]
        if name == "hf_generate_batch":
            def run() -> tuple[float, dict[str, Any]]:
                return hf_generate_batch(model, pair.prompts, spec.output_tokens, dev)

            def warm() -> object:
                return hf_generate_batch(model, warm_prompts, spec.warmup_tokens, dev)
        else:
            size = STATIC_BATCH[name]

            def run() -> tuple[float, dict[str, Any]]:
                return hf_static_batches(model, pair.prompts, size, spec.output_tokens,
                                         pair.pad_id, dev)

            def warm() -> object:
                return hf_static_batches(model, warm_prompts, size, spec.warmup_tokens,
                                         pair.pad_id, dev)
        rep = repeat(run, args.peer_reps, [warm] * args.warmup, deadline, name)
        return rep.summary()
    static = name == "hf_static_cache"

    def one() -> tuple[float, dict[str, Any]]:
        return hf_latency_run(model, pair.prompts[0], spec.output_tokens, pair.pad_id, dev,
                              static)

    # The static cache compiles on its first calls: warm it up twice.
    warmups = 2 if static else max(1, args.warmup)
    rep: Repeated = repeat(one, args.peer_reps, [one] * warmups, deadline, name)
    return rep.summary()


# --- the record ------------------------------------------------------------------------------
def build_record(
    pair: Pair, base: dict[str, Any], floor: dict[str, float] | None, spec: Any
) -> dict[str, Any]:
    res = pair.results
    ok = {k: v["median"] for k, v in res.items() if "median" in v}
    project = ok.get("project")
    peers = {k: ok[k] for k in pair.peers if k in ok}
    ratios: dict[str, float] = {}
    main = pair.variants[0] if pair.variants else "fast"
    variants = {v: ok.get(result_name(v, main)) for v in pair.variants}
    rec: dict[str, Any] = {
        "workload": WORKLOAD_IDS[pair.workload], "model": pair.model, **base,
        # The GPUs of the headline figure's engine (2 when it is a sharded variant).
        "gpus": pair.gpus.get(main, base.get("gpus")),
        "unit": "tokens/s" if pair.workload == "throughput" else "decode tokens/s",
        "project": project, "project_variant": main, "project_variants": variants,
        "variant_gpus": {v: pair.gpus[v] for v in pair.variants},
        "variant_ranks": {v: VARIANTS[v].ranks for v in pair.variants},
        "peers": peers, "ratios": ratios,
    }
    if pair.workload == "latency" and floor is not None:
        floor_s = pair.param_bytes / floor["bytes_per_s"]  # seconds per token, one device
        rec["floor"] = {
            "bandwidth_GBps": floor["GBps"], "params": pair.params,
            "param_bytes": pair.param_bytes, "ms_per_token": floor_s * 1e3,
            "tokens_per_s": 1.0 / floor_s,
        }
        # Each variant against the floor of the devices it reads the weights on at once: a
        # tensor group of N reads 1/N of them per device (floor / N); one device, or a layer
        # split whose ranks take turns, reads them all in sequence (one device's floor).
        variant_floor_s = {v: floor_s / VARIANTS[v].parallel_reads for v in pair.variants}
        rec["variant_floor_ms_per_token"] = {v: f * 1e3 for v, f in variant_floor_s.items()}
        if project is not None:
            ratios["fraction_of_floor"] = project * variant_floor_s.get(main, floor_s)
        rec["peer_fraction_of_floor"] = {k: v * floor_s for k, v in peers.items()}
        rec["variant_fraction_of_floor"] = {
            k: v * variant_floor_s[k] for k, v in variants.items() if v is not None
        }
    if project is not None:
        for k, v in peers.items():
            if v > 0:
                ratios[f"vs_{k}"] = project / v
        # Each other variant against the headline one, e.g. thread_vs_fast, tp2_vs_fast.
        for k, v in variants.items():
            if k != main and v is not None and project > 0:
                ratios[f"{k}_vs_{main}"] = v / project
    rec["settings"] = {**base.pop("settings"), "workload": asdict(spec),
                       "variant_settings": dict(pair.variant_settings)}
    rec["errors"] = {k: v["error"] for k, v in res.items() if "error" in v}
    rec["skipped"] = {k: v["skipped"] for k, v in res.items() if "skipped" in v}
    rec["details"] = res
    return rec


def build_tp_record(
    pair: Pair, latency: dict[str, Any], variant: str = TP_VARIANT
) -> dict[str, Any] | None:
    """W-tp (BENCHMARKS.md): the W-latency figure of a tensor-parallel variant (TP_VARIANT by
    default) against the 1-GPU one of the same run (the first single-rank variant timed,
    normally `fast`); its floor is parameter bytes / (ranks x copy bandwidth), each device
    reading its share."""
    if pair.workload != "latency" or variant not in pair.variants:
        return None
    main = pair.variants[0]
    tp = pair.results.get(result_name(variant, main), {})
    one = next((v for v in pair.variants if VARIANTS[v].ranks == 1), None)
    one_res = pair.results.get(result_name(one, main), {}) if one is not None else {}
    project = tp.get("median")
    one_gpu = one_res.get("median")
    ratios: dict[str, float] = {}
    rec: dict[str, Any] = {
        "workload": "W-tp", "model": pair.model,
        **{k: latency[k] for k in ("card", "date", "commit", "backend", "reps", "python",
                                   "torch", "transformers", "cuda") if k in latency},
        "gpus": pair.gpus[variant], "unit": latency["unit"],
        "project": project, "project_variant": variant,
        "one_gpu": {"variant": one, "gpus": pair.gpus.get(one) if one else None,
                    "median": one_gpu},
        "peers": {}, "ratios": ratios,
    }
    if project is not None and one_gpu:
        ratios["vs_1gpu"] = project / one_gpu
    floor = latency.get("floor")
    if floor is not None:
        ranks = VARIANTS[variant].parallel_reads
        floor_s = floor["ms_per_token"] / 1e3 / ranks
        rec["floor"] = {**floor, "ranks": ranks, "ms_per_token": floor_s * 1e3,
                        "tokens_per_s": 1.0 / floor_s}
        if project is not None:
            ratios["fraction_of_floor"] = project * floor_s
        if one_gpu is not None:
            rec["one_gpu"]["fraction_of_floor"] = one_gpu * floor["ms_per_token"] / 1e3
    names = {"project": tp, "one_gpu": one_res}
    rec["settings"] = {**latency["settings"],
                       "variant_settings": {k: pair.variant_settings[v] for k, v in
                                            (("project", variant), ("one_gpu", one)) if v}}
    rec["errors"] = {k: v["error"] for k, v in names.items() if "error" in v}
    rec["skipped"] = {k: v["skipped"] for k, v in names.items() if "skipped" in v}
    if one is None:
        rec["skipped"]["one_gpu"] = "no single-device variant in --variants"
    rec["details"] = {k: v for k, v in names.items() if v}
    return rec


def tensor_variants(pair: Pair) -> list[str]:
    """The pair's tensor-parallel variants over several GPUs, TP_VARIANT first."""
    found = [v for v in pair.variants
             if VARIANTS[v].shard_strategy == "tensor" and VARIANTS[v].ranks > 1]
    return sorted(found, key=lambda v: v != TP_VARIANT)


# --- orchestration ---------------------------------------------------------------------------
def parse_variants(
    p: argparse.ArgumentParser, text: str, models: list[str]
) -> tuple[list[str], dict[str, list[str]]]:
    """--variants: every variant in timing order (`fast` first: it is the headline), and the
    variants of each model in that order (NAME@MODEL+MODEL limits NAME to those models)."""
    order: list[str] = []
    where: dict[str, set[str]] = {}
    for item in (s.strip() for s in text.split(",") if s.strip()):
        name, _, only = item.partition("@")
        if name not in VARIANTS:
            p.error(f"unknown variant {name!r}; choose from {list(VARIANTS)}")
        chosen = [m.strip() for m in only.split("+") if m.strip()] if only else list(models)
        unknown = [m for m in chosen if m not in MODELS]
        if unknown:
            p.error(f"--variants {item}: unknown model(s) {unknown}; choose from {list(MODELS)}")
        if name not in where:
            order.append(name)
            where[name] = set()
        where[name].update(chosen)
    if not order:
        p.error("--variants names no variant")
    # The headline variant first: it is timed first and its figure is `project`.
    order.sort(key=lambda v: v != "fast")
    per_model = {m: [v for v in order if m in where[v]] for m in models}
    empty = [m for m, vs in per_model.items() if not vs]
    if empty:
        p.error(f"--variants {text}: no variant runs on {empty}")
    return [v for v in order if any(v in vs for vs in per_model.values())], per_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=["throughput", "latency", "all"], default="all")
    p.add_argument("--model", action="append", metavar="NAME[,NAME]",
                   help=f"one of {', '.join(MODELS)}; repeat or comma-separate (default 1b)")
    p.add_argument("--out", type=Path, default=DEFAULT_RESULTS_DIR, help="JSON directory")
    p.add_argument("--model-dir", type=Path, default=Path("/tmp/tideq-bench-models"),
                   help="where checkpoints are built (reused when present)")
    p.add_argument("--backend", choices=["native", "hf", "auto"], default="native")
    p.add_argument("--device", default="cuda", help="cuda or cpu")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--reps", type=int, default=None,
                   help="timed runs of the project (default 3; 2 with --quick)")
    p.add_argument("--peer-reps", type=int, default=None,
                   help="timed runs of each HF peer (default 2; 1 with --quick)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs before timing")
    p.add_argument("--peers", default="all",
                   help="comma list of hf_generate, hf_generate_static64, hf_generate_static256,"
                        " hf_generate_batch, hf_static_cache; 'all' or 'none'")
    p.add_argument("--variants", default="fast", metavar="NAME[@MODEL[+MODEL]],...",
                   help="comma list of the project's variants to time, of "
                        + "; ".join(f"{k} ({v.about})" for k, v in VARIANTS.items())
                        + ". NAME@MODEL times it on those models only (tp2@8b,"
                        " thread@1b+8b). The JSON's `project` is fast (else the first),"
                        " `project_variants` has each")
    p.add_argument("--profile", action="store_true",
                   help="one extra run of the fast variant recording per-step host time,"
                        " time blocked on the device and device time (JSON details.profile)")
    p.add_argument("--quick", action="store_true", help="tiny sizes for a CPU smoke run")
    p.add_argument("--time-budget", type=float, default=None, metavar="S",
                   help="seconds for the whole run; contenders past it are skipped and recorded"
                        f" (default {GPU_TIME_BUDGET_S:.0f} on a GPU, none on CPU; 0: none)")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=8192)
    p.add_argument("--max-model-len", type=int, default=1024)
    p.add_argument("--all-pairs", action="store_true",
                   help="also run workloads on models BENCHMARKS.md does not define them on")
    p.add_argument("--commit", default=None, help="commit to record (default: git / $TIDEQ_COMMIT)")
    args = p.parse_args(argv)
    models: list[str] = []
    for item in args.model or ["1b"]:
        for m in item.split(","):
            if m.strip() and m.strip() not in models:
                models.append(m.strip())
    unknown = [m for m in models if m not in MODELS]
    if unknown:
        p.error(f"unknown model(s) {unknown}; choose from {list(MODELS)}")
    args.models = models
    args.variant_list, args.variant_models = parse_variants(p, args.variants, models)
    args.workloads = ["throughput", "latency"] if args.workload == "all" else [args.workload]
    args.reps = args.reps or (2 if args.quick else 3)
    args.peer_reps = args.peer_reps or (1 if args.quick else 2)
    known = {n for names in PEERS.values() for n in names}
    if args.peers == "all":
        args.peer_set = known
    elif args.peers == "none":
        args.peer_set = set()
    else:
        args.peer_set = set()
        for name in (s.strip() for s in args.peers.split(",") if s.strip()):
            if name not in known and name not in PEER_ALIASES:
                p.error(f"unknown peer {name!r}; choose from {sorted(known | set(PEER_ALIASES))}")
            args.peer_set.update(PEER_ALIASES.get(name, (name,)))
    if args.time_budget is None and args.device.startswith("cuda"):
        args.time_budget = GPU_TIME_BUDGET_S
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device (use --device cpu)")
    return args


def prepare_checkpoint(args: argparse.Namespace, model: str) -> Path:
    from engine.random_checkpoint import ensure_checkpoint

    path = args.model_dir / f"llama-{model}"
    t0 = time.perf_counter()
    if path.exists() and not (path / BUILD_MARKER).exists():
        # The builder writes its marker last: without it a run was cut while writing the
        # weights (a `timeout` mid-save), and the shards there may be partial.
        log(f"checkpoint {model}: {path} is incomplete; building it again")
        shutil.rmtree(path)
    # Built on the card (fast for 8b) in the benchmark dtype; reused when already there.
    ensure_checkpoint(path, arch="llama", shape=model, dtype=args.dtype, seed=0,
                      device=args.device)
    free_device_memory(args.device)
    log(f"checkpoint {model}: {path} ({time.perf_counter() - t0:.1f}s)")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    def on_term(signum: int, frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    deadline = Deadline(args.time_budget)
    tspec = QUICK_THROUGHPUT if args.quick else ThroughputSpec()
    lspec = QUICK_LATENCY if args.quick else LatencySpec()
    specs: dict[str, Any] = {"throughput": tspec, "latency": lspec}
    card = card_name(args.device)
    base: dict[str, Any] = {
        # Replaced per record by the GPUs of its headline figure's engine.
        "card": card, "gpus": 1 if args.device.startswith("cuda") else 0, "date": today(),
        "commit": git_commit(args.commit), "backend": args.backend,
        "reps": {"project": args.reps, "peers": args.peer_reps, "warmup": args.warmup},
        **{k: v for k, v in versions().items()},
    }
    settings = {
        "device": args.device, "dtype": args.dtype, "quick": args.quick,
        "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
        "max_model_len": args.max_model_len, "time_budget_s": args.time_budget,
        "variants": args.variant_list, "profile": args.profile,
        "visible_gpus": torch.cuda.device_count() if args.device.startswith("cuda") else 0,
        "greedy": True, "ignore_eos": True,
    }
    log(f"card {card}; backend {args.backend}; models {args.models}; workloads {args.workloads};"
        f" reps project {args.reps} / peers {args.peer_reps}; commit {base['commit']}")
    log(" ".join(f"{k} {v}" for k, v in versions().items()))

    pairs: list[Pair] = []
    # Per pair: its record, and W-tp's when the pair times the tensor-parallel variant.
    records: dict[int, list[dict[str, Any]]] = {}
    floor: dict[str, float] | None = None

    def save(pair: Pair) -> None:
        rec = build_record(pair, {**base, "settings": dict(settings)}, floor,
                           specs[pair.workload])
        records[id(pair)] = [rec]
        write_result(args.out, rec)
        for variant in tensor_variants(pair):
            tp = build_tp_record(pair, rec, variant)
            if tp is not None:
                records[id(pair)].append(tp)
                # tp2's file keeps its name; another variant's carries the variant's.
                write_result(args.out, tp, None if variant == TP_VARIANT else variant)

    def table() -> list[dict[str, Any]]:
        return [rec for p in pairs for rec in records.get(id(p), [])]

    def contender(pair: Pair, name: str, fn: Callable[[], dict[str, Any]]) -> None:
        if deadline.expired():
            pair.results[name] = {"skipped": f"time budget {args.time_budget}s spent"}
            log(f"{pair.workload}/{pair.model} {name}: skipped (time budget)")
        else:
            log(f"{pair.workload}/{pair.model} {name}: start")
            try:
                pair.results[name] = fn()
                log(f"{pair.workload}/{pair.model} {name}: median "
                    f"{pair.results[name]['median']:,.1f}")
            except Interrupted:
                pair.results[name] = {"skipped": "interrupted"}
                raise
            except Exception as err:  # any failure is recorded; the run goes on
                traceback.print_exc()
                pair.results[name] = {"error": f"{type(err).__name__}: {err}"[:2000]}
                log(f"{pair.workload}/{pair.model} {name}: FAILED {pair.results[name]['error']}")
                free_device_memory(args.device)
        save(pair)

    try:
        if "latency" in args.workloads:
            nbytes = QUICK_BANDWIDTH_BYTES if args.quick else BANDWIDTH_BYTES
            floor = measure_bandwidth(args.device, nbytes)
            log(f"bandwidth floor: {floor['GBps']:,.1f} GB/s (copy of {nbytes >> 20} MiB)")
        for model in args.models:
            ckpt = prepare_checkpoint(args, model)
            allowed, pad_id, _ = allowed_token_ids(ckpt)
            params = count_params(ckpt)
            for wl in args.workloads:
                if model not in DEFINED_ON[wl] and not args.all_pairs:
                    log(f"{WORKLOAD_IDS[wl]} is not defined on {model}: skipped (--all-pairs)")
                    continue
                variants = list(args.variant_models[model])
                pair = Pair(wl, model, ckpt, [n for n in PEERS[wl] if n in args.peer_set],
                            variants=variants, pad_id=pad_id, params=params,
                            param_bytes=params * torch.finfo(getattr(torch, args.dtype)).bits // 8,
                            gpus={v: variant_gpus(args, v) for v in variants},
                            variant_settings={v: variant_settings(args, v) for v in variants})
                if wl == "throughput":
                    pair.prompts = throughput_prompts(allowed, tspec)
                else:
                    pair.prompts = random_prompts(allowed, [lspec.prompt_tokens], lspec.seed)
                pairs.append(pair)

        # Phase 1: every project figure (the headline variant of every pair first, then the
        # second of every pair, ...). A variant this machine cannot run is skipped, with why.
        for index in range(max((len(p.variants) for p in pairs), default=0)):
            for pair in pairs:
                if index >= len(pair.variants):
                    continue
                spec = specs[pair.workload]
                fn = project_throughput if pair.workload == "throughput" else project_latency
                variant = pair.variants[index]
                name = result_name(variant, pair.variants[0])
                reason = variant_unavailable(args, variant)
                if reason is not None:
                    log(f"{pair.workload}/{pair.model} {name}: skipped ({reason})")
                    pair.results[name] = {"skipped": reason}
                    save(pair)
                    continue
                contender(pair, name,
                          lambda fn=fn, pair=pair, spec=spec, variant=variant:
                          fn(args, pair, spec, deadline, variant))
                free_device_memory(args.device)
        # Phase 2: the peers the headline ratios need; phase 3: the others, cheapest first
        # (latency peers take seconds, throughput peers a minute or more each).
        for headline in (True, False):
            order = pairs if headline else sorted(pairs, key=lambda p: p.workload != "latency")
            for pair in order:
                names = [n for n in pair.peers if (n == RATIO_PEER[pair.workload]) == headline]
                if not names:
                    continue
                if deadline.expired():  # do not even load the model
                    for n in names:
                        contender(pair, n, lambda: {})  # records the skip, never called
                    continue
                spec = specs[pair.workload]
                try:
                    with hf_model(args, pair.checkpoint) as model:
                        for n in names:
                            contender(pair, n, lambda n=n, pair=pair, spec=spec, model=model:
                                      run_peer(n, model, args, pair, spec, deadline))
                except Interrupted:
                    raise
                except Exception as err:  # the model did not load: every peer of it failed
                    traceback.print_exc()
                    for n in names:
                        pair.results.setdefault(n, {"error": f"load: {type(err).__name__}: {err}"})
                    save(pair)
    except (Interrupted, KeyboardInterrupt) as err:
        log(f"interrupted ({err}); writing what was measured")
        for pair in pairs:
            names = [result_name(v, pair.variants[0]) for v in pair.variants]
            for n in [*names, *pair.peers]:
                pair.results.setdefault(n, {"skipped": "interrupted"})
            save(pair)
        print_table(table())
        return 130

    for pair in pairs:
        save(pair)
    print_table(table())
    log(f"wrote {len(table())} JSON file(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
