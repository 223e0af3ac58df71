"""The native generation backend: this project's scheduler, paged KV cache and model code.

backend = NativeBackend(EngineConfig(model_path=..., dtype="float32", device="cpu"))
backend.add_request("r1", prompt_token_ids, SamplingParams(max_tokens=32), priority=1)
while backend.has_unfinished():
    for output in backend.step():
        ...  # output.new_token_ids, output.finished, output.finish_reason
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import torch

from engine.checkpoint import eos_token_ids
from engine.config import EngineConfig
from engine.core.backend import GenerationBackend, StepOutput
from engine.core.collector import FullCollections
from engine.core.kv_cache import BlockManager
from engine.core.scheduler import Scheduler, SchedulerOutput
from engine.core.sequence import Sequence
from engine.core.step_trace import StepTrace
from engine.devices import resolve_device
from engine.distributed import ParallelGroup
from engine.executor.runner import LaunchedStep, ModelRunner
from engine.models import ARCHITECTURES
from engine.request import EngineError, PromptTooLongError, SamplingParams

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


def supports(model_path: str | Path) -> bool:
    """Whether the checkpoint's config.json names an architecture the native backend runs."""
    try:
        config = json.loads((Path(model_path) / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return any(arch in ARCHITECTURES for arch in config.get("architectures") or [])


def resolve_dtype(name: str) -> torch.dtype:
    """The activation dtype: int8 is weight-only, with bfloat16 activations."""
    if name == "int8":
        return torch.bfloat16
    if name not in DTYPES:
        raise EngineError(f"unknown dtype {name!r}; choose from {sorted(DTYPES)}")
    return DTYPES[name]


class NativeBackend(GenerationBackend):
    """Continuous batching with priorities and preemption over a paged KV cache.

    Args:
        config: engine settings; model_path must hold a supported architecture.
        group: the ranks the model is sharded over (a group of one when None), as
            config.shard_strategy says ("tensor" or "layer"). Each rank runs in its own
            process, with torch.distributed initialised (config.distributed_backend: NCCL for
            GPUs, gloo for the CPU) and, on a GPU, its own device made current; it builds its
            own backend, and all ranks must then be fed the same calls (add_request,
            abort_request, step) in the same order, so that their schedulers make the same
            decisions and their collectives line up. Every rank's step returns the same
            outputs.
    """

    def __init__(self, config: EngineConfig, group: ParallelGroup | None = None) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.config = config
        self.group = group or ParallelGroup()
        if config.group_size != self.group.world_size:
            raise EngineError(
                f"group_size {config.group_size} needs a ParallelGroup of that many ranks, one"
                f" process each (got a group of {self.group.world_size})"
            )
        self.device = resolve_device(config.device)
        dtype = resolve_dtype(config.dtype)
        tensor_on_gpus = config.shard_strategy == "tensor" and self.device.type == "cuda"
        if config.custom_all_reduce and tensor_on_gpus and self.group.world_size > 1:
            # Imported here: Triton is loaded only where a GPU group may use it.
            from engine.kernels.all_reduce import with_push_all_reduce

            self.group = with_push_all_reduce(self.group, self.device, dtype)
        hf_config = AutoConfig.from_pretrained(config.model_path)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model_path)
        self.eos_token_ids = eos_token_ids(config.model_path, hf_config)
        self.max_model_len = config.max_model_len
        limit = getattr(hf_config, "max_position_embeddings", None)
        if limit is not None and limit < self.max_model_len:
            log.warning(
                "max_model_len %d exceeds the model's %d positions; using %d",
                self.max_model_len,
                limit,
                limit,
            )
            self.max_model_len = limit
        self.runner = ModelRunner(
            config, hf_config, self.device, dtype, self.max_model_len, self.group
        )
        self.scheduler = Scheduler(
            BlockManager(self.runner.num_blocks, config.block_size, config.enable_prefix_caching),
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            reserved_high_slots=config.reserved_high_slots,
            max_model_len=self.max_model_len,
            eos_token_ids=self.eos_token_ids,
            low_seqs_while_high=config.low_seqs_while_high,
            low_tokens_while_high=config.low_tokens_while_high,
            lane_linger_steps=config.lane_linger_steps,
            # Every rank of a group captures the same sizes, so their schedulers agree.
            step_token_sizes=self.runner.mixed_step_sizes,
        )
        # The steps the last `step` call scheduled or postprocessed (None: it failed before
        # scheduling), whose requests a failure is blamed on.
        self._last_steps: list[SchedulerOutput] | None = None
        # The step launched last and not yet postprocessed (async scheduling): its output and
        # its tokens on their way.
        self._inflight: tuple[SchedulerOutput, LaunchedStep] | None = None
        # Rank 0 traces the group's steps (every rank makes the same ones).
        self.trace = StepTrace.from_env() if self.group.rank == 0 else None
        self._waited = 0.0  # traced: seconds this step call waited for the device
        # Set by a rank process (engine/core_process.py): runs its full garbage collections
        # after steps without high work. None: CPython's own schedule (a core in a thread).
        self.collector: FullCollections | None = None

    def add_request(
        self, request_id: str, prompt_token_ids: list[int], sampling: SamplingParams, priority: int
    ) -> None:
        if not prompt_token_ids:
            raise EngineError(f"request {request_id}: empty prompt")
        if len(prompt_token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"request {request_id}: prompt of {len(prompt_token_ids)} tokens leaves no room"
                f" to generate within max_model_len={self.max_model_len}"
            )
        if min(prompt_token_ids) < 0 or max(prompt_token_ids) >= self.runner.vocab_size:
            raise EngineError(f"request {request_id}: token id outside the vocabulary")
        if request_id in self.scheduler.seqs:
            raise EngineError(f"request {request_id} is already queued")
        seq = Sequence(
            request_id, prompt_token_ids, sampling, priority, self.scheduler.next_arrival()
        )
        self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        self.scheduler.abort(request_id)

    def step(self) -> list[StepOutput]:
        """Schedule and launch a step; with async scheduling, return what the step launched
        by the call before produced (its tokens are read while this one runs), else this
        step's own results.

        Errors (torch.OutOfMemoryError included) go to the front, which isolates the request
        at fault and re-admits the others; it aborts every request first, which resets the
        scheduler's state of a step that never reached postprocess (and the step in flight
        is dropped here)."""
        self._last_steps = None
        tracing = self.trace is not None
        started = time.time() if tracing else 0.0
        self._waited = 0.0
        inflight, self._inflight = self._inflight, None
        out = self.scheduler.schedule()
        self._last_steps = [out] if inflight is None else [inflight[0], out]
        launched = None
        if not out.is_empty:
            launched = self.runner.launch(out, inflight[1] if inflight is not None else None)
        launched_at = time.time() if tracing else 0.0
        outputs = self._postprocess(inflight)
        if launched is not None:
            if self.config.async_scheduling:
                self._inflight = (out, launched)
            else:
                outputs = self._postprocess((out, launched))
        if self.trace is not None and not out.is_empty:
            self.trace.record(started, launched_at, self._waited, time.time(), out,
                              self.scheduler)
        if self.collector is not None and not out.is_empty:
            # After the launch: the device has this step to run meanwhile.
            self.collector.after_step(self.scheduler.high_work)
        return outputs

    def drain(self) -> list[StepOutput]:
        """Finish the step still in flight, launching none: what it produced."""
        inflight, self._inflight = self._inflight, None
        return self._postprocess(inflight)

    def _postprocess(self, step: tuple[SchedulerOutput, LaunchedStep] | None) -> list[StepOutput]:
        """A launched step's results, once its tokens are on the host (none for None)."""
        if step is None:
            return []
        if self.trace is None:
            return self.scheduler.postprocess(step[0], step[1].tokens())
        # Traced: how long the host sat waiting for the device (none: the host set the pace).
        waiting = time.perf_counter()
        tokens = step[1].tokens()
        self._waited += time.perf_counter() - waiting
        return self.scheduler.postprocess(step[0], tokens)

    def close(self) -> None:
        """Release the device resources that outlive a step (the captured decode graphs).
        A rank of a group must close its backend before torch.distributed's
        destroy_process_group: NCCL waits for every graph that captured its collectives to
        be destroyed first."""
        if self.trace is not None:
            self.trace.flush()
        self._inflight = None
        self.runner.close()

    def last_step_request_ids(self) -> set[str] | None:
        # Built only when asked (a failed step): the step launched and the one in flight.
        if self._last_steps is None:
            return None
        return {c.seq.seq_id for out in self._last_steps for c in out.chunks}

    def has_unfinished(self) -> bool:
        # A step in flight holds live sequences only while the scheduler does (they finish
        # in postprocess); one left with aborted sequences alone has nothing to report.
        return self.scheduler.has_unfinished()

    def stats(self) -> dict[str, Any]:
        blocks = self.scheduler.block_manager
        return {
            "running": len(self.scheduler.running),
            "waiting": len(self.scheduler.waiting),
            "num_preemptions": self.scheduler.num_preemptions,
            "kv_blocks_total": blocks.num_blocks,
            "kv_blocks_free": blocks.num_free_blocks,
            "kv_blocks_cached": blocks.num_cached_blocks,
            "kv_blocks_evicted": blocks.num_evictions,
            "prefix_cache_query_tokens": self.scheduler.prefix_cache_query_tokens,
            "prefix_cache_hit_tokens": self.scheduler.prefix_cache_hit_tokens,
            "tokens_generated": self.scheduler.num_generated_tokens,
        }
