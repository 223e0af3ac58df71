"""The engine's own settings. A plain dataclass: the deployment YAML (tasks/config.py) is
validated there and mapped onto this, so the engine does not depend on the config schema."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DType = Literal["float32", "float16", "bfloat16", "int8"]
Backend = Literal["auto", "native", "hf", "echo"]
ShardStrategy = Literal["none", "tensor", "layer"]


@dataclass
class EngineConfig:
    """Args:
    model_path: a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files).
    dtype: weight/activation dtype; "int8" is weight-only int8 with bfloat16 activations.
    max_model_len: prompt + output tokens a sequence may hold.
    backend: "native" (paged KV cache, own scheduler), "hf" (transformers), "auto" (native
        where the architecture is supported); "echo" answers at once with the prompt's start
        and loads no model (measuring the queue path, smoke tests).
    device: "cpu", "cuda" or "auto" (cuda when available).
    max_num_seqs: sequences running at once (the deployment's batch_size_per_gpu x group size).
    max_num_batched_tokens: tokens one step may process; longer prompts are prefilled in chunks.
    block_size: tokens per KV-cache block.
    kv_cache_memory_fraction: share of the device memory left after the weights given to the
        KV cache (GPU only).
    num_kv_blocks: an explicit KV-cache size in blocks; overrides the fraction (tests use it
        to force preemption; on CPU the default is enough blocks for max_num_seqs full sequences).
        A cache shorter than max_model_len still serves: a request whose prompt and max_tokens
        could never fit it fails alone (KVCacheTooSmallError).
    reserved_high_slots: running slots only `high` requests may take (priority allocation).
    low_seqs_while_high / low_tokens_while_high: while a `high` request runs or waits, the
        most `low` sequences that compute in one step, and the most tokens they compute (the
        others keep their cache and sit the step out); None: no limit (priority allocation).
    lane_linger_steps: steps those limits still hold after the last `high` request has left,
        so that a stream of high jobs does not meet a full-width step of low prompts between
        two of them (each step ~2 ms in the lane: 64 steps are ~0.1 s of low work held back).
    max_prompt_tokens: the longest prompt accepted; default max_model_len - 1.
    enforce_eager: no CUDA graphs / compilation (debugging).
    decode_lookahead: while a greedy decode step runs, launch the next one (same sequences, one
        token on, its input tokens taken on the device), so the host's bookkeeping of a step
        overlaps the device's work on the next; used when the scheduler then asks for exactly
        that step, discarded (its cache writes are harmless) when it asks for another.
    async_scheduling: schedule and launch each step before the step ahead of it has finished
        (its sampled tokens feed the next step's inputs on the device; the host reads them,
        and finishes sequences, one step later), so that the host's work for a step, the
        scheduler's above all, overlaps the device's work on the step before. Off: each step
        waits for the one before (decode_lookahead then overlaps pure decode steps alone).
    enable_prefix_caching: keep computed full KV blocks so that prompts sharing a prefix
        (one system prompt, many questions) compute it once (native backend).
    mixed_step_graphs: on a GPU, steps that prefill (alone or with decode rows) replay CUDA
        graphs captured at padded token counts up to max_num_batched_tokens, instead of
        launching ~10 kernels per layer from Python (engine/executor/mixed_graphs.py); off
        runs them eagerly (comparisons, debugging).
    custom_all_reduce: with tensor sharding on GPUs, small sums (decode steps) are pushed
        into the peers' buffers over PyTorch's symmetric memory, with the residual add and
        norm after the attention block in the same kernel, instead of going to NCCL
        (engine/kernels/all_reduce.py); off keeps every sum on NCCL (comparisons, debugging).
    """

    model_path: str
    dtype: DType = "bfloat16"
    max_model_len: int = 2048
    backend: Backend = "auto"
    device: str = "auto"
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    kv_cache_memory_fraction: float = 0.9
    num_kv_blocks: int | None = None
    reserved_high_slots: int = 0
    low_seqs_while_high: int | None = None
    low_tokens_while_high: int | None = None
    lane_linger_steps: int = 64
    # Longest prompt accepted (None: max_model_len - 1); the deployment's limit.
    max_prompt_tokens: int | None = None
    enforce_eager: bool = False
    # On by default: a batch-1 decode step is ~1 ms of device time against ~0.15 ms of host
    # work that would otherwise leave the device idle.
    decode_lookahead: bool = True
    # On by default: a step that prefills left the device idle through ~0.6 ms of host work
    # on either side of it (an H200 host, 1b), a third of the steps in a priority lane.
    async_scheduling: bool = True
    # On by default: greedy outputs are unchanged, and unshared prompts lose nothing.
    enable_prefix_caching: bool = True
    # On by default: a small mixed step costs 13-16 ms of host time eagerly against ~2 ms of
    # device work (bench/profile_mixed.py).
    mixed_step_graphs: bool = True
    # On by default: ~2.5x faster than NCCL for a decode step's sums (engine/distributed.py).
    custom_all_reduce: bool = True
    # Sharding over a group of devices, one process per device (engine/core_process.py).
    shard_strategy: ShardStrategy = "none"
    group_size: int = 1
    distributed_backend: Literal["nccl", "gloo"] = "nccl"
    seed: int = 0
    # Where the scheduler and the model run: "process", spawned processes (rank 0 and one per
    # further device), so that the front's Python work (task threads, Redis, detokenising)
    # never competes with the step loop for one GIL; "thread", a thread of this process (tests
    # that hand the engine a ready backend, and debugging).
    core: Literal["process", "thread"] = "process"

    def __post_init__(self) -> None:
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
        if not 0.0 < self.kv_cache_memory_fraction <= 1.0:
            raise ValueError("kv_cache_memory_fraction must be in (0, 1]")
        if self.reserved_high_slots >= self.max_num_seqs:
            raise ValueError("reserved_high_slots must leave at least one slot for low work")
