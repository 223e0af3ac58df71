"""Runs the model for one scheduled step: builds the flat token batch, runs the forward pass
over the paged KV cache and samples the next token of every sequence whose chunk completed.

The runner owns the model and the cache tensors of its rank. In a sharded group every rank
has its own scheduler, fed the same calls, so every rank builds the same step inputs from its
own (identical) scheduler output and no inputs travel; what must agree afterwards is the
sampled tokens, which every rank's scheduler appends:

- tensor parallel: every rank computes the same gathered logits, so greedy rows agree as they
  are; rows drawn at random are broadcast from rank 0 (the ranks' random generators differ);
- layer split: only the last rank computes logits; its tokens are broadcast to the others.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from engine.config import EngineConfig
from engine.distributed import ParallelGroup
from engine.executor.cuda_graphs import DecodeGraphs, GraphStep, TokenPatch
from engine.executor.loader import load_model
from engine.executor.mixed_graphs import MixedGraphs
from engine.executor.sampler import sample
from engine.executor.step import ScheduledStep
from engine.layers.attention import (
    ChunkSpec,
    PagedAttention,
    TritonPagedAttention,
    paged_attention,
)
from engine.models import CausalLM
from engine.request import EngineError

log = logging.getLogger(__name__)

MIB = 1 << 20
# splitmix64 constants: a seeded request's noise for output position i is drawn from a
# generator seeded with mix(seed, i), so it is the same whether or not the request was
# preempted and recomputed, and whatever else shares the batch.
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1, _MIX2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_MASK64 = (1 << 64) - 1


def blocks_for_sequences(num_seqs: int, max_model_len: int, block_size: int) -> int:
    """Blocks for `num_seqs` sequences of `max_model_len` tokens each (the CPU default)."""
    return num_seqs * -(-max_model_len // block_size)


def block_bytes(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype_bytes: int
) -> int:
    """Bytes one block takes across all layers, keys and values."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes


def _splitmix64(x: int) -> int:
    z = (x + _GOLDEN) & _MASK64
    z = ((z ^ (z >> 30)) * _MIX1) & _MASK64
    z = ((z ^ (z >> 27)) * _MIX2) & _MASK64
    return z ^ (z >> 31)


def token_seed(seed: int, position: int) -> int:
    """A well-mixed 63-bit seed for the noise of one output position of a seeded request."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ position) >> 1


@dataclass
class GraphInputs:
    """A pure decode step's inputs, one entry per sequence."""

    seq_ids: list[str]
    ids: list[int]
    positions: list[int]
    slots: list[int]
    tables: list[list[int]]


@dataclass
class Lookahead:
    """A decode step launched before the scheduler asked for it (see decode_lookahead)."""

    seq_ids: list[str]
    positions: list[int]
    slots: list[int]
    step: GraphStep

    def serves(self, inputs: GraphInputs) -> bool:
        """Whether this is the step `inputs` asks for (same sequences, positions, slots)."""
        return (
            self.seq_ids == inputs.seq_ids
            and self.positions == inputs.positions
            and self.slots == inputs.slots
        )


class LaunchedStep:
    """A step queued on the device: its sampled tokens, one per sampling chunk, on the device
    (where the next step may read them before they reach the host) and, once the step has
    finished, on the host (`tokens`)."""

    def __init__(self, device_tokens: torch.Tensor | None, host_tokens: torch.Tensor | None,
                 ready: torch.cuda.Event | None, select: list[int] | None = None) -> None:
        self.device_tokens = device_tokens
        self._host = host_tokens
        self._ready = ready
        self._select = select  # the host tensor's rows that are this step's tokens
        self._tokens: list[int] | None = None
        # (kind, step, t0, t_enqueued, start, end) for ModelRunner._record
        self.timing: tuple[Any, ...] | None = None

    @classmethod
    def done(cls, tokens: list[int], device_tokens: torch.Tensor | None) -> LaunchedStep:
        """A step that has already run (eagerly): its tokens are on the host."""
        launched = cls(device_tokens, None, None)
        launched._tokens = tokens
        return launched

    @classmethod
    def copying(cls, tokens: torch.Tensor) -> LaunchedStep:
        """A step whose sampled `tokens` (on the device) start their way to the host now."""
        if tokens.device.type != "cuda":
            return cls.done(tokens.tolist(), tokens)
        host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        return cls(tokens, host, ready)

    def tokens(self) -> list[int]:
        """The sampled tokens, once the step has finished (blocks until then)."""
        if self._tokens is None:
            if self._ready is not None:
                self._ready.synchronize()
            assert self._host is not None
            tokens: list[int] = self._host.tolist()
            if self._select is not None:
                tokens = [tokens[i] for i in self._select]
            self._tokens = tokens
        return self._tokens


def use_triton(device: torch.device, config: EngineConfig) -> bool:
    """Whether the model's layers run their Triton kernels (attention, norms, rotary, the
    activation, decode-sized matmuls): on a GPU, unless config.enforce_eager."""
    return device.type == "cuda" and not config.enforce_eager


class ModelRunner:
    """One rank's model and KV cache.

    Args:
        config: engine settings (cache sizing, block size, max_num_seqs).
        hf_config: the checkpoint's transformers config.
        dtype: of the activations and the KV cache (bfloat16 for config.dtype "int8").
        max_model_len: longest sequence served (sizes the position tables and the cache).
        attention: the paged-attention implementation; when None, the Triton kernels on a GPU
            (plain PyTorch with config.enforce_eager, or on the CPU). The other layers pick
            their kernels alike (`use_triton`) when the model is built.

    On a GPU without enforce_eager, pure decode steps replay CUDA graphs
    (engine.executor.cuda_graphs) captured once the cache exists (on every rank of a tensor-parallel
    group, each capturing the same batch sizes in the same order, collectives included), and
    steps with prefill chunks replay graphs of padded token counts
    (engine.executor.mixed_graphs; config.mixed_step_graphs); steps larger than any captured
    size, and every step of a layer split, run eagerly.

    In a group (group.world_size > 1) config.shard_strategy picks tensor parallelism or the
    layer split; every rank must be fed the same steps in the same order.
    """

    def __init__(
        self,
        config: EngineConfig,
        hf_config: Any,
        device: torch.device,
        dtype: torch.dtype,
        max_model_len: int,
        group: ParallelGroup,
        attention: PagedAttention | None = None,
    ) -> None:
        self.config = config
        self.device = device
        self.dtype = dtype
        self.group = group
        if group.world_size > 1 and config.shard_strategy not in ("tensor", "layer"):
            raise EngineError(
                f"a group of {group.world_size} ranks needs shard_strategy tensor or layer,"
                f" not {config.shard_strategy!r}"
            )
        self.split_layers = group.world_size > 1 and config.shard_strategy == "layer"
        self.block_size = config.block_size
        fast = device.type == "cuda" and not config.enforce_eager
        triton = use_triton(device, config)
        self.attention: PagedAttention = attention or paged_attention(triton)
        with self._on_device():
            self._build(config, hf_config, max_model_len, fast, triton)

    def _build(
        self, config: EngineConfig, hf_config: Any, max_model_len: int, fast: bool, triton: bool
    ) -> None:
        device, dtype, group = self.device, self.dtype, self.group
        self.model: CausalLM = load_model(
            hf_config,
            config.model_path,
            dtype,
            device,
            group,
            self.attention,
            max_model_len,
            int8=config.dtype == "int8",
            split_layers=self.split_layers,
            triton=triton,
        )
        args = self.model.args
        # This rank's layers and key/value heads: all heads of its layers in a layer split,
        # its share of every layer's heads in tensor parallelism.
        self.num_layers = self.model.layer_split.num_local_layers
        heads_group = ParallelGroup() if self.split_layers else group
        self.num_kv_heads = heads_group.split(args.num_kv_heads, "key/value heads")
        self.head_dim = args.head_dim
        self.vocab_size = args.vocab_size
        self.num_blocks = self._decide_num_blocks(max_model_len)
        # One block more than the scheduler hands out: padding rows of a captured decode
        # step write their keys and values there.
        self.scratch_block = self.num_blocks
        # [layers, keys/values, blocks + scratch, block_size, Hkv, Dh]
        self.kv_cache = torch.zeros(
            self.num_layers,
            2,
            self.num_blocks + 1,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            dtype=dtype,
            device=device,
        )
        self.kv_caches = [
            (self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(self.num_layers)
        ]
        log.info(
            "KV cache: %d blocks x %d tokens = %d tokens, %.1f MiB",
            self.num_blocks,
            self.block_size,
            self.num_blocks * self.block_size,
            self.kv_cache.numel() * self.kv_cache.element_size() / MIB,
        )
        self.max_blocks = -(-max_model_len // self.block_size)
        self.max_model_len = max_model_len
        self.lookahead: Lookahead | None = None
        self.graphs: DecodeGraphs | None = None
        self.mixed: MixedGraphs | None = None
        # The layer split runs eagerly: it exists for capacity (a model too large for one
        # device), not speed, and its ranks take turns within a step anyway.
        if fast and not self.split_layers:
            collectives = group.world_size > 1
            pool = None
            if config.mixed_step_graphs and isinstance(self.attention, TritonPagedAttention):
                self.mixed = MixedGraphs(
                    self.model,
                    self.kv_caches,
                    config.max_num_batched_tokens,
                    config.max_num_seqs,
                    self.max_blocks,
                    self.block_size,
                    self.scratch_block,
                    self.attention.prefill_tile,
                    device,
                    collectives=collectives,
                )
                pool = self.mixed.capture()
            self.graphs = DecodeGraphs(
                self.model,
                self.kv_caches,
                config.max_num_seqs,
                self.max_blocks,
                self.block_size,
                self.scratch_block,
                device,
                collectives=collectives,
            )
            self.graphs.capture(pool)
        # Per-step timings when a list (set by the benchmark's --profile): see _record.
        self.profile: list[dict[str, Any]] | None = None

    @property
    def mixed_step_sizes(self) -> list[int] | None:
        """The token counts a step with prefill chunks is padded to (its captured graphs), or
        None where such steps run eagerly, unpadded."""
        if self.mixed is None:
            return None
        return [layout.tokens for layout in self.mixed.layouts]

    def _decide_num_blocks(self, max_model_len: int) -> int:
        per_block = block_bytes(
            self.num_layers,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
            torch.empty((), dtype=self.dtype).element_size(),
        )
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        elif self.device.type == "cuda":
            # A group's first collective creates NCCL's communicator and its device buffers,
            # which must be in place before the free memory is measured.
            self.group.min(0, self.device)
            free, _ = torch.cuda.mem_get_info(self.device)
            num_blocks = int(free * self.config.kv_cache_memory_fraction) // per_block
        else:
            num_blocks = blocks_for_sequences(
                self.config.max_num_seqs, max_model_len, self.block_size
            )
        # Every rank's scheduler must hand out the same blocks, so the group agrees on the
        # smallest cache any rank can hold (free memory differs between devices, and the
        # ranks of a layer split hold different layers and weights).
        num_blocks = self.group.min(num_blocks, self.device)
        if num_blocks < 1:
            raise EngineError(
                f"no device memory is left for the KV cache (one block takes {per_block} bytes):"
                " raise kv_cache_memory_fraction, use a smaller dtype (float16, int8) or shard"
                " the model over more GPUs"
            )
        if num_blocks * self.block_size < max_model_len:
            # Still serving: a request that cannot fit fails alone when it is added
            # (Scheduler.add), the others run.
            log.warning(
                "the KV cache (%d blocks x %d tokens) holds less than one sequence of"
                " max_model_len=%d tokens; requests needing more are refused",
                num_blocks,
                self.block_size,
                max_model_len,
            )
        return num_blocks

    def close(self) -> None:
        """Release the captured decode graphs; call before destroying the group's process
        group (see DecodeGraphs.release). The runner runs eagerly afterwards."""
        self.lookahead = None
        with self._on_device():
            if self.graphs is not None:
                self.graphs.release()
            if self.mixed is not None:
                self.mixed.release()
        self.graphs = None
        self.mixed = None

    @contextlib.contextmanager
    def _on_device(self) -> Iterator[None]:
        """This rank's GPU as the current device (Triton launches on the current device, and
        a step may run in another thread than the one that built the runner)."""
        if self.device.type != "cuda":
            yield
            return
        with torch.cuda.device(self.device):
            yield

    @torch.inference_mode()
    def execute(self, out: ScheduledStep) -> list[int]:
        """Run one step; return the sampled token of each of `out.sampling_chunks` (the same
        on every rank of a group)."""
        return self.launch(out).tokens()

    @torch.inference_mode()
    def launch(self, out: ScheduledStep, prev: LaunchedStep | None = None) -> LaunchedStep:
        """Queue one step on the device and return without waiting for it (a captured graph;
        eager steps run to the end). prev: the step launched before it, whose sampled tokens
        feed the chunks that take their first token from it (`input_from`), on the device
        where it still runs."""
        with self._on_device():
            launched = self._launch(out, prev)
            if self.profile is not None:
                launched.tokens()  # timed to the end of the step (see _record)
                assert launched.timing is not None
                end = launched.timing[-1]
                if end is not None:
                    end.synchronize()
                self._record(*launched.timing)
            return launched

    def _launch(self, out: ScheduledStep, prev: LaunchedStep | None) -> LaunchedStep:
        t0 = time.perf_counter()
        start = self._event() if self.profile is not None else None
        chunks = out.chunks
        graphs = self.graphs
        pending, self.lookahead = self.lookahead, None
        # What the paths below ask of the step, in one pass (at a batch of 256 the host's
        # work sets a decode step's pace): its tokens, its sampling chunks' indices, and
        # whether all of those are greedy.
        total = 0
        sampling: list[int] = []
        greedy = True
        for i, chunk in enumerate(chunks):
            total += chunk.num_tokens
            if chunk.samples:
                sampling.append(i)
                greedy = greedy and chunk.seq.sampling.greedy
        if (
            graphs is not None
            and total == len(chunks)  # every chunk one token: a pure decode step
            and graphs.batch_size_for(len(chunks)) is not None
        ):
            launched, kind = self._decode_graph(out, graphs, pending, prev, sampling, greedy)
            # a lookahead step's device time overlapped the host: its start is unknown
            launched.timing = (kind, out, t0, time.perf_counter(),
                               start if kind == "graph" else None, self._profile_event())
            return launched
        mixed = self.mixed
        layout = mixed.layout_for(total, len(chunks)) if mixed is not None else None
        if mixed is not None and layout is not None:
            prev_tokens = prev.device_tokens if prev is not None else None
            step = mixed.launch(chunks, layout, prev_tokens)
            launched = self._graph_result(step, out, list(range(len(sampling))), greedy)
            launched.timing = ("mixed", out, t0, time.perf_counter(), start,
                               self._profile_event())
            return launched
        logits = self._eager(out, prev)
        if not sampling:
            launched = LaunchedStep.done([], None)
            launched.timing = ("eager", out, t0, time.perf_counter(), None, None)
            return launched
        tokens = self._sample(logits, out)
        t_enqueued = time.perf_counter()
        end = self._profile_event()
        launched = LaunchedStep.done(tokens.tolist(), tokens)
        launched.timing = ("eager", out, t0, t_enqueued, start, end)
        return launched

    def _profile_event(self) -> torch.cuda.Event | None:
        return self._event() if self.profile is not None else None

    def _decode_graph(
        self, out: ScheduledStep, graphs: DecodeGraphs, pending: Lookahead | None,
        prev: LaunchedStep | None, sampling: list[int], greedy: bool,
    ) -> tuple[LaunchedStep, str]:
        """A pure decode step through the captured graphs, served by the pending lookahead
        when it is this step. `sampling`: the indices of its sampling chunks; `greedy`:
        whether all of those are. Returns the launched step and its kind."""
        # The lookahead (only without async scheduling) matches steps by their sequences.
        lookahead = self.config.decode_lookahead and not self.config.async_scheduling
        inputs, patch = self._graph_inputs(out, prev, seq_ids=lookahead)
        if pending is not None and pending.serves(inputs):
            step, kind = pending.step, "lookahead"
        else:
            step = graphs.launch(inputs.ids, inputs.positions, inputs.slots, inputs.tables,
                                 patch=patch)
            kind = "graph"
        if lookahead and greedy and len(sampling) == len(out.chunks):
            self.lookahead = self._launch_lookahead(out, inputs, step, graphs)
        return self._graph_result(step, out, sampling, greedy), kind

    def _graph_result(self, step: GraphStep, out: ScheduledStep,
                      sampling: list[int], greedy: bool) -> LaunchedStep:
        """The sampled tokens of a launched graph step whose rows `sampling` are the sampling
        chunks': each row's argmax where all of them are `greedy`, else drawn here."""
        if greedy:
            if len(sampling) == step.n:  # every row samples: the graph's own outputs
                return LaunchedStep(step.tokens, step.host_tokens, step.ready,
                                    select=None)
            rows = torch.tensor(sampling, device=self.device)
            return LaunchedStep(step.tokens.index_select(0, rows), step.host_tokens,
                                step.ready, select=sampling)
        logits = step.logits
        if len(sampling) < step.n:
            logits = logits[torch.tensor(sampling, device=self.device)]
        return LaunchedStep.copying(self._sample(logits, out))

    def _graph_inputs(
        self, out: ScheduledStep, prev: LaunchedStep | None, seq_ids: bool = True
    ) -> tuple[GraphInputs, TokenPatch | None]:
        """A decode step's inputs and, where chunks take their token from the step before
        (still on the device), the patch that supplies them. `seq_ids`: list the sequences
        too (what a lookahead is matched by)."""
        bs = self.block_size
        inputs = GraphInputs([], [], [], [], [])
        ids, positions, slots, tables = inputs.ids, inputs.positions, inputs.slots, inputs.tables
        rows: list[int] = []
        sources: list[int] = []
        for i, chunk in enumerate(out.chunks):
            p = chunk.start
            seq = chunk.seq
            table = seq.block_table
            if chunk.input_from is None:
                ids.append(seq.token_ids[p])
            else:
                ids.append(0)
                rows.append(i)
                sources.append(chunk.input_from)
            positions.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            tables.append(table)  # the list itself: DecodeGraphs writes what changed
        if seq_ids:
            inputs.seq_ids = [chunk.seq.seq_id for chunk in out.chunks]
        if not rows:
            return inputs, None
        assert prev is not None and prev.device_tokens is not None, "no step before"
        return inputs, TokenPatch(rows, sources, prev.device_tokens)

    def _launch_lookahead(
        self, out: ScheduledStep, inputs: GraphInputs, step: GraphStep, graphs: DecodeGraphs
    ) -> Lookahead | None:
        """Launch the step after `step` (every sequence one token on, input tokens from
        step's argmax on the device) where the scheduler will likely ask for it next: no
        sequence is known to finish (length limits), no waiting request may be admitted, and
        every next position already has its cache block."""
        if (not self.config.decode_lookahead or self.config.async_scheduling
                or out.admission_possible):
            return None  # (async scheduling launches the next step itself)
        bs = self.block_size
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        for chunk in out.chunks:
            seq = chunk.seq
            p = chunk.start + 1
            table = seq.block_table
            if (  # this step's token is output number p + 1 - prompt, the lookahead's next
                p + 2 - seq.num_prompt_tokens > seq.sampling.max_tokens
                or p + 1 >= self.max_model_len
                or p // bs >= len(table)
            ):
                return None
            positions.append(p)
            slots.append(table[p // bs] * bs + p % bs)
            tables.append(table)
        ahead = graphs.launch([], positions, slots, tables, ids_from=step.tokens)
        return Lookahead(inputs.seq_ids, positions, slots, ahead)

    def _eager(self, out: ScheduledStep, prev: LaunchedStep | None) -> torch.Tensor | None:
        """Any step, run eagerly; logits [N, V] of the sampling rows (None when no chunk
        samples, or on a rank of a layer split without the vocabulary head). Tokens of the
        step before (`input_from`) are waited for."""
        ids: list[int] = []
        positions: list[int] = []
        specs: list[ChunkSpec] = []
        last_rows: list[int] = []
        for chunk in out.chunks:
            end = chunk.start + chunk.num_tokens
            if chunk.input_from is not None:
                assert prev is not None, "a token of the step before, and no step before"
                ids.append(prev.tokens()[chunk.input_from])
                ids.extend(chunk.seq.token_ids[chunk.start + 1 : end])
            else:
                ids.extend(chunk.seq.token_ids[chunk.start : end])
            positions.extend(range(chunk.start, end))
            specs.append(ChunkSpec(chunk.start, chunk.num_tokens, chunk.seq.block_table))
            if chunk.samples:
                last_rows.append(len(ids) - 1)
        meta = self.attention.build_metadata(specs, self.block_size, self.device)
        t = len(ids)
        # ids | positions | sampling rows, in one transfer
        packed = torch.tensor(ids + positions + last_rows, dtype=torch.long)
        packed = packed.to(self.device, non_blocking=True)
        input_ids, pos, rows = packed.split([t, t, len(last_rows)])  # [T], [T], [N]
        # Every rank of a layer split runs its layers here, taking its input from the rank
        # before and handing its output on (inside the model).
        hidden: torch.Tensor = self.model(input_ids, pos, self.kv_caches, meta)  # [T, D]
        if not last_rows or not self.model.layer_split.is_last:
            return None
        logits: torch.Tensor = self.model.compute_logits(hidden[rows])  # [N, V]
        return logits

    def _sample(self, logits: torch.Tensor | None, out: ScheduledStep) -> torch.Tensor:
        """The next token of each sampling chunk ([N] long), the same on every rank.

        logits: [N, V], or None on a rank of a layer split without the vocabulary head."""
        chunks = out.sampling_chunks
        params = [c.seq.sampling for c in chunks]
        greedy = all(p.greedy for p in params)
        if logits is None:  # filled by the last rank's broadcast below
            tokens = torch.empty(len(chunks), dtype=torch.long, device=self.device)
        elif greedy:
            tokens = logits.argmax(dim=-1)
        else:
            generators = [
                None
                if c.seq.sampling.greedy
                # the output position this token takes
                else self._generator(c.seq.sampling.seed,
                                     c.start + c.num_tokens - c.seq.num_prompt_tokens)
                for c in chunks
            ]
            tokens = sample(logits, params, generators)
        if self.split_layers:
            return self.group.broadcast(tokens, self.model.layer_split.last_rank)
        if not greedy:
            # Tensor parallel: the logits are the same on every rank, but unseeded rows draw
            # from each process's own generator; rank 0's draw is the group's.
            return self.group.broadcast(tokens, 0)
        return tokens

    def _event(self) -> torch.cuda.Event | None:
        if self.device.type != "cuda":
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _record(
        self,
        kind: str,
        out: ScheduledStep,
        t0: float,
        t_enqueued: float,
        start: torch.cuda.Event | None,
        end: torch.cuda.Event | None,
    ) -> None:
        """One step's timings: host_s from the step's start until its last kernel was queued,
        wait_s blocked on the sampled tokens, gpu_s between the step's first and last device
        work (idle gaps, where the device waited for the host, included; None on the CPU)."""
        assert self.profile is not None
        now = time.perf_counter()
        self.profile.append(
            {
                "kind": kind,
                "seqs": len(out.chunks),
                "tokens": sum(c.num_tokens for c in out.chunks),
                "host_s": t_enqueued - t0,
                "wait_s": now - t_enqueued,
                "gpu_s": None if start is None or end is None else start.elapsed_time(end) / 1e3,
            }
        )

    def _generator(self, seed: int | None, position: int) -> torch.Generator | None:
        if seed is None:
            return None
        generator = torch.Generator(device=self.device)
        generator.manual_seed(token_seed(seed, position))
        return generator
