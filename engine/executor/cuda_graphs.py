"""CUDA graphs of the decode step: the model's forward pass plus the vocabulary head, captured
once per padded batch size over static input buffers.

A step whose chunks are all one token long (pure decode) picks the smallest captured batch size
that holds it, writes its inputs into one pinned host buffer, copies that buffer to the device
in one transfer and replays the graph. Rows past the real batch are padding: they write their
key/value into a scratch cache block that no sequence owns and attend to it alone. Each graph
ends with the argmax of every row (engine.kernels.argmax), which greedy steps use as their
tokens. Steps with longer chunks (prefill) have graphs of their own
(engine.executor.mixed_graphs).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.layers.attention import AttentionMetadata
from engine.models import CausalLM

if TYPE_CHECKING:
    # What CUDAGraph.pool() returns: a memory pool later captures may share.
    from torch.cuda import _POOL_HANDLE as GraphPool


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """engine.kernels.argmax.argmax, imported on first use (only captured graphs need it).

    logits: [B, V] -> [B] long"""
    from engine.kernels.argmax import argmax as triton_argmax

    return triton_argmax(logits)


log = logging.getLogger(__name__)

MIB = 1 << 20
# Batch sizes captured: every power of two up to 16, then steps of 16 (padding wastes at most
# 15 rows of a batch where most of a step's time is the weights' read, shared by all rows).
SMALL_SIZES = (1, 2, 4, 8)
SIZE_STEP = 16

KVCache = tuple[torch.Tensor, torch.Tensor]


@dataclass
class GraphStep:
    """A captured step (decode or mixed) queued on the device. `logits` [n, V] and `tokens`
    [n] (each row's argmax) are views of the graph's output buffers, valid until the next
    launch of the same graphs; the tokens also travel to pinned host memory (`host_tokens`,
    there once `ready` has passed; engine.executor.runner.LaunchedStep reads them)."""

    n: int
    logits: torch.Tensor
    tokens: torch.Tensor
    host_tokens: torch.Tensor
    ready: torch.cuda.Event | None


@dataclass
class TokenPatch:
    """Input ids of a step that the step before it sampled and the host does not have yet
    (the scheduler runs a step ahead): row `rows[i]` of the step's ids is `tokens[sources[i]]`,
    copied on the device after the step's inputs arrive and before it runs."""

    rows: list[int]
    sources: list[int]
    tokens: torch.Tensor  # [N] the step before's sampled tokens, on the device


def send_inputs(staging: HostStaging, turn: int, buffer: torch.Tensor, used: int,
                ids: torch.Tensor, patch: TokenPatch | None) -> None:
    """Queue the copy of a step's first `used` inputs from host buffer `turn` into `buffer`
    and then, for a patch, its rows and sources (written just past the inputs, so that one
    copy carries both; the buffers have room for them) and the copy of those tokens into
    `ids`, the device view of the step's input ids."""
    if patch is None or not patch.rows:
        staging.send(turn, buffer, used)
        return
    m = len(patch.rows)
    h = staging.inputs_np[turn]
    h[used : used + m] = patch.rows
    h[used + m : used + 2 * m] = patch.sources
    staging.send(turn, buffer, used + 2 * m)
    picked = patch.tokens.index_select(0, buffer[used + m : used + 2 * m])
    ids.index_copy_(0, buffer[used : used + m], picked)


def write_table_row(rows: np.ndarray, written: list[tuple[list[int] | None, int]], i: int,
                    table: list[int]) -> None:
    """Bring row i of a host buffer's block tables up to `table`, writing only what changed.
    A running sequence's table is one list that only grows (a preempted or new sequence gets a
    new list, and holding the old one in `written` keeps its identity from being reused), so
    a row that held the same list needs only its new blocks."""
    held, count = written[i]
    if held is not table:
        rows[i, : len(table)] = table
        written[i] = (table, len(table))
    elif len(table) > count:
        rows[i, count : len(table)] = table[count:]
        written[i] = (table, len(table))


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in SMALL_SIZES if s < max_num_seqs]
    sizes += list(range(SIZE_STEP, max_num_seqs, SIZE_STEP))
    return [*sizes, max_num_seqs]


class HostStaging:
    """A captured step's way in and out of the device: its integer inputs, written on the host
    and sent in one copy, and its sampled tokens, copied back. Two pinned buffers of each are
    used in turn: a step may be launched while the one before it still runs (its inputs still
    being copied, its tokens not read yet), so neither may be overwritten. On the CPU: plain
    memory and no events.

    Args:
        size: int64 inputs of the largest step.
        rows: tokens sampled by the largest step.
    """

    def __init__(self, size: int, rows: int, device: torch.device) -> None:
        cuda = device.type == "cuda"
        self.inputs = [torch.zeros(size, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self.inputs_np: list[np.ndarray] = [h.numpy() for h in self.inputs]
        self._sent = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._tokens = [torch.zeros(rows, dtype=torch.long, pin_memory=cuda) for _ in range(2)]
        self._tokens_ready = [torch.cuda.Event() if cuda else None for _ in range(2)]
        self._turn = 0

    def next_turn(self) -> int:
        """The buffers of the next step (write its inputs into inputs_np[turn]), once their
        last copy to the device, two launches ago, has left them."""
        turn = self._turn
        self._turn ^= 1
        sent = self._sent[turn]
        if sent is not None:
            sent.synchronize()
        return turn

    def send(self, turn: int, device_buffer: torch.Tensor, used: int) -> None:
        """Queue the copy of the first `used` inputs of `turn` into device_buffer."""
        device_buffer[:used].copy_(self.inputs[turn][:used], non_blocking=True)
        sent = self._sent[turn]
        if sent is not None:
            sent.record()

    def fetch(
        self, turn: int, n: int, tokens: torch.Tensor
    ) -> tuple[torch.Tensor, torch.cuda.Event | None]:
        """Queue the copy of a step's `n` sampled tokens to the host; returns the host tensor
        and the event after which it holds them (None on the CPU: at once)."""
        host = self._tokens[turn][:n]
        host.copy_(tokens, non_blocking=True)
        ready = self._tokens_ready[turn]
        if ready is not None:
            ready.record()
        return host, ready


class DecodeGraphs:
    """Captured decode steps of one model and cache.

    Args:
        model: the loaded model (its forward and compute_logits are captured).
        kv_caches: each layer's (keys, values) cache views.
        max_num_seqs: the largest batch captured.
        max_blocks: block-table width: blocks of the longest sequence.
        block_size: tokens per cache block.
        scratch_block: a cache block no sequence is given (padding rows write there).
        replay: capture and replay graphs (CUDA); False runs the same static buffers eagerly,
            which is how the CPU tests check the buffers' layout and padding.
        collectives: the model's forward pass holds NCCL collectives (a tensor-parallel
            rank). Every rank must then capture, and replay, the same batch sizes in the same
            order, which graph_batch_sizes and the replicated scheduler give.
    """

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[KVCache],
        max_num_seqs: int,
        max_blocks: int,
        block_size: int,
        scratch_block: int,
        device: torch.device,
        replay: bool = True,
        collectives: bool = False,
    ) -> None:
        self.model = model
        self.replay = replay
        # PyTorch's NCCL watchdog thread queries the events of collectives launched before a
        # capture (the warm-up's); under the default "global" capture mode such a call from
        # another thread invalidates the capture. "thread_local" still refuses unsafe calls
        # from this thread, and lets the watchdog be.
        self.capture_error_mode = "thread_local" if collectives else "global"
        self.kv_caches = kv_caches
        self.sizes = graph_batch_sizes(max_num_seqs)
        self.max_bs = m = self.sizes[-1]
        self.max_blocks = max_blocks
        self.block_size = block_size
        self.scratch_block = scratch_block
        self.device = device
        # One flat int64 buffer, the same layout on host and device:
        # ids [M] | positions [M] | slots [M] | context lens [M] | block tables [M, max_blocks].
        self.o_ids, self.o_pos, self.o_slots, self.o_lens, self.o_tab = (
            0, m, 2 * m, 3 * m, 4 * m
        )  # fmt: skip
        total = 4 * m + m * max_blocks
        # room past the inputs for a TokenPatch of every row
        self.staging = HostStaging(total + 2 * m, m, device)
        # Per host buffer: the block table each row was last written from and how many of
        # its blocks, so that a step writes only what changed. A running sequence's table is
        # one list that only grows (a preempted or new sequence gets a new list, and holding
        # the old one here keeps its identity from being reused), so in a steady batch a row
        # is rewritten once every block_size steps instead of every step: at a batch of 256,
        # writing every row was most of the host's work to fill a step.
        self._written: list[list[tuple[list[int] | None, int]]] = [
            [(None, 0)] * m for _ in range(len(self.staging.inputs))
        ]
        self.buffer = torch.zeros(total + 2 * m, dtype=torch.long, device=device)
        self.rows = torch.arange(m, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}  # each row's argmax, for greedy rows

    def _views(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        b = self.buffer
        m = self.max_bs
        tables = b[self.o_tab : self.o_tab + m * self.max_blocks].view(m, self.max_blocks)
        meta = AttentionMetadata(
            slot_mapping=b[self.o_slots : self.o_slots + bs],
            decode_rows=self.rows[:bs],
            decode_block_tables=tables[:bs],
            decode_context_lens=b[self.o_lens : self.o_lens + bs],
            prefills=[],
        )
        return b[self.o_ids : self.o_ids + bs], b[self.o_pos : self.o_pos + bs], meta

    @torch.inference_mode()
    def capture(self, pool: GraphPool | None = None) -> None:
        """Capture every batch size, largest first, in one memory pool (`pool`: one the mixed
        steps' graphs already use, so that both share their working memory)."""
        t0 = time.perf_counter()
        free_before, _ = torch.cuda.mem_get_info(self.device)
        self._fill(0, [], [], [], [], self.max_bs)  # every row padding: writes go to scratch
        self.buffer.copy_(self.staging.inputs[0])
        for bs in reversed(self.sizes):
            ids, pos, meta = self._views(bs)
            # Warm-up outside the graph (compiles the kernels, settles the allocator).
            argmax(self.model.compute_logits(self.model(ids, pos, self.kv_caches, meta)))
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=self.capture_error_mode):
                hidden = self.model(ids, pos, self.kv_caches, meta)
                self.logits[bs] = self.model.compute_logits(hidden)  # [bs, V]
                self.tokens[bs] = argmax(self.logits[bs])  # [bs]
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        log.info(
            "captured %d decode graphs (batch sizes %s) in %.2fs, %.0f MiB",
            len(self.sizes),
            self.sizes,
            time.perf_counter() - t0,
            (free_before - free_after) / MIB,
        )

    def release(self) -> None:
        """Destroy the captured graphs (their memory goes back to the pool). NCCL holds a
        communicator until every graph that captured its collectives is destroyed: a
        tensor-parallel rank must release its graphs before the process group is destroyed,
        or that waits for ever."""
        if self.graphs:  # captured (CUDA): nothing may still be replaying them
            torch.cuda.synchronize(self.device)
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.logits.clear()
        self.tokens.clear()

    def batch_size_for(self, n: int) -> int | None:
        """The smallest captured batch size >= n (None when n is too large)."""
        for bs in self.sizes:
            if bs >= n:
                return bs
        return None

    def _fill(
        self,
        turn: int,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        bs: int,
    ) -> None:
        """Write a step's inputs into host buffer `turn`; rows n..bs are padding."""
        n = len(positions)
        h = self.staging.inputs_np[turn]
        scratch_slot = self.scratch_block * self.block_size
        h[self.o_ids : self.o_ids + len(ids)] = ids
        h[self.o_ids + len(ids) : self.o_ids + bs] = 0
        h[self.o_pos : self.o_pos + n] = positions
        h[self.o_pos + n : self.o_pos + bs] = 0
        h[self.o_slots : self.o_slots + n] = slots
        h[self.o_slots + n : self.o_slots + bs] = scratch_slot
        lens = h[self.o_lens : self.o_lens + bs]
        lens[:n] = positions
        lens[:n] += 1
        lens[n:] = 1
        tab = h[self.o_tab : self.o_tab + bs * self.max_blocks].reshape(bs, self.max_blocks)
        written = self._written[turn]
        for i, table in enumerate(tables):
            held, count = written[i]
            if held is not table or len(table) > count:  # (most rows: neither, no call)
                write_table_row(tab, written, i, table)
        tab[n:, 0] = self.scratch_block
        for i in range(n, bs):
            written[i] = (None, 0)

    def launch(
        self,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        ids_from: torch.Tensor | None = None,
        patch: TokenPatch | None = None,
    ) -> GraphStep:
        """Queue one decode step of len(positions) sequences on the device and return at once.

        tables[i] holds (at least) the blocks up to positions[i]: pass the sequence's own
        block-table list, not a copy, so that unchanged rows are not written again (_fill).
        ids_from: [n] device tensor of the input tokens when the host does not have them yet
        (the previous step's argmax, still being computed: `ids` is then empty); stream order
        makes the copy wait for it. patch: rows whose ids (0 in `ids`) come from the step
        before's tokens on the device.
        """
        n = len(positions)
        bs = self.batch_size_for(n)
        assert bs is not None, f"no graph holds a batch of {n}"
        staging = self.staging
        turn = staging.next_turn()
        self._fill(turn, ids, positions, slots, tables, bs)
        send_inputs(staging, turn, self.buffer, self.o_tab + bs * self.max_blocks,
                    self.buffer[self.o_ids : self.o_ids + n], patch)
        if ids_from is not None:
            self.buffer[self.o_ids : self.o_ids + n].copy_(ids_from)
        if self.replay:
            self.graphs[bs].replay()
            logits, tokens = self.logits[bs][:n], self.tokens[bs][:n]
        else:
            ids_t, pos_t, meta = self._views(bs)
            logits = self.model.compute_logits(self.model(ids_t, pos_t, self.kv_caches, meta))
            logits = logits[:n]
            tokens = logits.argmax(dim=-1)
        host_tokens, ready = staging.fetch(turn, n, tokens)
        return GraphStep(n, logits, tokens, host_tokens, ready)
