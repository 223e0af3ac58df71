"""CUDA graphs of the decode step: the model's forward pass plus the vocabulary head, captured
once per padded batch size over static input buffers.

A step whose chunks are all one token long (pure decode) picks the smallest captured batch size
that holds it, writes its inputs into one pinned host buffer, copies that buffer to the device
in one transfer and replays the graph. Rows past the real batch are padding: they write their
key/value into a scratch cache block that no sequence owns and attend to it alone. Each graph
ends with the argmax of every row (engine.triton_argmax), which greedy steps use as their
tokens. Steps with longer chunks (prefill) run eagerly.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from engine.attention import AttentionMetadata
from engine.models import CausalLM


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """engine.triton_argmax.argmax, imported on first use (only captured graphs need it).

    logits: [B, V] -> [B] long"""
    from engine.triton_argmax import argmax as triton_argmax

    return triton_argmax(logits)

log = logging.getLogger(__name__)

MIB = 1 << 20
# Batch sizes captured: every power of two up to 16, then steps of 16 (padding wastes at most
# 15 rows of a batch where most of a step's time is the weights' read, shared by all rows).
SMALL_SIZES = (1, 2, 4, 8)
SIZE_STEP = 16

KVCache = tuple[torch.Tensor, torch.Tensor]


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    sizes = [s for s in SMALL_SIZES if s < max_num_seqs]
    sizes += list(range(SIZE_STEP, max_num_seqs, SIZE_STEP))
    return [*sizes, max_num_seqs]


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
    ) -> None:
        self.model = model
        self.replay = replay
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
        self.host = torch.zeros(total, dtype=torch.long, pin_memory=device.type == "cuda")
        self.host_np: np.ndarray = self.host.numpy()
        self.buffer = torch.zeros(total, dtype=torch.long, device=device)
        self.rows = torch.arange(m, dtype=torch.long, device=device)
        self.copied = torch.cuda.Event() if device.type == "cuda" else None
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self.tokens: dict[int, torch.Tensor] = {}  # each row's argmax, for greedy rows

    def _views(self, bs: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        b = self.buffer
        m = self.max_bs
        tables = b[self.o_tab :].view(m, self.max_blocks)
        meta = AttentionMetadata(
            slot_mapping=b[self.o_slots : self.o_slots + bs],
            decode_rows=self.rows[:bs],
            decode_block_tables=tables[:bs],
            decode_context_lens=b[self.o_lens : self.o_lens + bs],
            prefills=[],
        )
        return b[self.o_ids : self.o_ids + bs], b[self.o_pos : self.o_pos + bs], meta

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture every batch size, largest first, in one memory pool."""
        t0 = time.perf_counter()
        free_before, _ = torch.cuda.mem_get_info(self.device)
        self._fill([], [], [], [], self.max_bs)  # every row padding: writes go to scratch
        self.buffer.copy_(self.host)
        pool = None
        for bs in reversed(self.sizes):
            ids, pos, meta = self._views(bs)
            # Warm-up outside the graph (compiles the kernels, settles the allocator).
            argmax(self.model.compute_logits(self.model(ids, pos, self.kv_caches, meta)))
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
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

    def batch_size_for(self, n: int) -> int | None:
        """The smallest captured batch size >= n (None when n is too large)."""
        for bs in self.sizes:
            if bs >= n:
                return bs
        return None

    def _fill(
        self,
        ids: list[int],
        positions: list[int],
        slots: list[int],
        tables: list[list[int]],
        bs: int,
    ) -> None:
        """Write a step's inputs into the host buffer; rows n..bs are padding."""
        n = len(ids)
        h = self.host_np
        scratch_slot = self.scratch_block * self.block_size
        h[self.o_ids : self.o_ids + n] = ids
        h[self.o_ids + n : self.o_ids + bs] = 0
        h[self.o_pos : self.o_pos + n] = positions
        h[self.o_pos + n : self.o_pos + bs] = 0
        h[self.o_slots : self.o_slots + n] = slots
        h[self.o_slots + n : self.o_slots + bs] = scratch_slot
        lens = h[self.o_lens : self.o_lens + bs]
        lens[:n] = positions
        lens[:n] += 1
        lens[n:] = 1
        tab = h[self.o_tab : self.o_tab + bs * self.max_blocks].reshape(bs, self.max_blocks)
        for i, table in enumerate(tables):
            tab[i, : len(table)] = table
        tab[n:, 0] = self.scratch_block

    def run(
        self, ids: list[int], positions: list[int], slots: list[int], tables: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One decode step of len(ids) sequences; tables[i] holds (at least) the blocks up to
        positions[i]. Returns the logits [n, V] and each row's argmax [n] (the greedy token),
        views of the graph's output buffers, valid until the next replay."""
        n = len(ids)
        bs = self.batch_size_for(n)
        assert bs is not None, f"no graph holds a batch of {n}"
        if self.copied is not None:
            self.copied.synchronize()  # the last step's copy has left the host buffer
        self._fill(ids, positions, slots, tables, bs)
        used = self.o_tab + bs * self.max_blocks
        self.buffer[:used].copy_(self.host[:used], non_blocking=True)
        if self.copied is not None:
            self.copied.record()
        if not self.replay:
            ids_t, pos_t, meta = self._views(bs)
            logits = self.model.compute_logits(self.model(ids_t, pos_t, self.kv_caches, meta))
            return logits[:n], logits[:n].argmax(dim=-1)
        self.graphs[bs].replay()
        return self.logits[bs][:n], self.tokens[bs][:n]
