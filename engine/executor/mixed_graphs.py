"""CUDA graphs of mixed steps: decode rows and prefill chunks in one batch, captured once per
padded token count.

Run eagerly, a mixed step of the 1b model costs 13-16 ms of host time (Triton launches and
cuBLAS calls, ~160 a step) for 2-3 ms of device work, so every step that admits new
sequences left the device idle most of the time, and every request in the batch waited for it
(bench/profile_mixed.py). Captured, the whole step is one graph launch.

A step of T tokens takes the smallest captured size S >= T. Everything whose shape depends on
the step's composition has a fixed size per captured size and is padded:

- the flat batch: rows T..S are padding tokens that write their keys and values into the
  scratch block no sequence owns;
- the decode rows (one-token chunks): a fixed number of entries, the padding ones with a
  context length of 0, which the decode kernel skips;
- the prefill chunks and their tiles (engine.kernels.attention): room for a fixed number of
  each, and the count of real tiles; the prefill kernel reads only the real tiles, and
  through them the real chunks, so the entries past them are never written;
- the sampling rows: a fixed number of rows gathered for the vocabulary head, the padding
  ones reading row 0.

All of a step's integers travel in one copy from a pinned host buffer, as in
engine.executor.cuda_graphs. The logits and tokens of every captured size are written into
one shared output buffer (each size keeping its own would hold gigabytes of logits).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

from engine.executor.cuda_graphs import (
    GraphStep,
    HostStaging,
    TokenPatch,
    argmax,
    send_inputs,
    write_table_row,
)
from engine.executor.step import StepChunk
from engine.layers.attention import AttentionMetadata, PrefillTiles
from engine.models import CausalLM

if TYPE_CHECKING:
    from engine.executor.cuda_graphs import GraphPool

log = logging.getLogger(__name__)

MIB = 1 << 20
KVCache = tuple[torch.Tensor, torch.Tensor]
# Token counts captured: every 64 up to 512, every 256 up to 4096, every 512 beyond. Padding
# costs device time in proportion (a mixed step is compute-bound), so the padding stays a
# small share of the step: small mixed steps are what a high job shares with the fast lane's
# low prefill (engine.core.scheduler), and padding 175 tokens to 256 cost it a third more.
SIZE_STEPS: tuple[tuple[int, int], ...] = ((512, 64), (4096, 256), (1 << 62, 512))


def mixed_token_sizes(max_tokens: int) -> list[int]:
    """The token counts captured for steps of at most max_tokens tokens."""
    sizes: list[int] = []
    size = 0
    for until, step in SIZE_STEPS:
        while size + step <= until and size + step < max_tokens:
            size += step
            sizes.append(size)
    return [*sizes, max_tokens]


@dataclass(frozen=True)
class MixedLayout:
    """The fixed sizes of one captured token count, and where each field sits in the flat
    int64 buffer (the same layout on host and device):

    ids [T] | positions [T] | slots [T] | decode rows [D] | decode context lens [D] |
    decode tables [D, B] | tiles used [1] | tile chunk [W] | tile start [W] | chunk row [P] |
    chunk len [P] | chunk ctx [P] | chunk tables [P, B] | sampling rows [R]

    P counts one chunk more than a step may have (room once kept for the padding tiles' empty
    chunk, which the prefill kernel no longer reads)."""

    tokens: int  # T
    decode: int  # D
    chunks: int  # P
    tiles: int  # W
    rows: int  # R
    blocks: int  # B, the block-table width

    @classmethod
    def for_tokens(cls, tokens: int, max_num_seqs: int, blocks: int, tile: int) -> MixedLayout:
        seqs = min(tokens, max_num_seqs)
        # Every prefill chunk holds two tokens or more, and n tokens take ceil(n / tile) tiles,
        # so the chunks of a step take at most tokens / tile + chunks tiles.
        chunks = min(tokens // 2, max_num_seqs)
        tiles = -(-tokens // tile) + chunks
        return cls(tokens, seqs, chunks + 1, tiles, seqs, blocks)

    @cached_property
    def offsets(self) -> dict[str, int]:
        t, d, p, w, b = self.tokens, self.decode, self.chunks, self.tiles, self.blocks
        sizes = [
            ("ids", t), ("pos", t), ("slots", t), ("d_rows", d), ("d_lens", d),
            ("d_tab", d * b), ("n_tiles", 1), ("t_chunk", w), ("t_start", w), ("c_row", p),
            ("c_len", p), ("c_ctx", p), ("c_tab", p * b), ("s_rows", self.rows), ("end", 0),
        ]  # fmt: skip
        offsets, at = {}, 0
        for name, size in sizes:
            offsets[name] = at
            at += size
        return offsets

    @property
    def total(self) -> int:
        return self.offsets["end"]


class MixedGraphs:
    """Captured mixed steps of one model and cache.

    Args:
        model: the loaded model, whose attention layers run the Triton kernels.
        kv_caches: each layer's (keys, values) cache views.
        max_tokens: the most tokens of one step (max_num_batched_tokens).
        max_num_seqs: the most sequences of one step.
        max_blocks: block-table width: blocks of the longest sequence.
        block_size: tokens per cache block.
        scratch_block: a cache block no sequence is given (padding tokens write there).
        tile: query tokens per prefill tile (engine.kernels.attention.PREFILL_BLOCK_M).
        replay: capture and replay graphs (CUDA); False runs the same static buffers eagerly,
            which is how the CPU tests check the buffers' layout and padding.
        collectives: the forward pass holds collectives (a tensor-parallel rank): every rank
            captures and replays the same sizes in the same order (see DecodeGraphs).
    """

    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[KVCache],
        max_tokens: int,
        max_num_seqs: int,
        max_blocks: int,
        block_size: int,
        scratch_block: int,
        tile: int,
        device: torch.device,
        replay: bool = True,
        collectives: bool = False,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.replay = replay
        self.capture_error_mode = "thread_local" if collectives else "global"
        self.block_size = block_size
        self.scratch_slot = scratch_block * block_size
        self.tile = tile
        self.device = device
        self.layouts = [
            MixedLayout.for_tokens(t, max_num_seqs, max_blocks, tile)
            for t in mixed_token_sizes(max_tokens)
        ]
        total = max(layout.total for layout in self.layouts)
        max_rows = max(layout.rows for layout in self.layouts)
        # room past the inputs for a TokenPatch of every decode row
        max_decode = max(layout.decode for layout in self.layouts)
        self.staging = HostStaging(total + 2 * max_decode, max_rows, device)
        self.buffer = torch.zeros(total + 2 * max_decode, dtype=torch.long, device=device)
        # Shared by every captured size (allocated by the first warm-up, which knows the
        # logits' dtype and vocabulary width).
        self.logits: torch.Tensor | None = None
        self.tokens = torch.zeros(max_rows, dtype=torch.long, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # The decode rows' block tables, kept from step to step as DecodeGraphs keeps its rows
        # (row i: the table of the step's i-th decode row, and the list and length written),
        # so that a step writes only the blocks that changed and then copies the rows into
        # its layout at once. Writing each row's table afresh was most of a mixed step's
        # host time (3 us a row: 0.2 ms before a step of 65 rows could start).
        self._decode_tables = np.zeros((max_decode, max_blocks), dtype=np.int64)
        self._written: list[tuple[list[int] | None, int]] = [(None, 0)] * max_decode

    @property
    def max_tokens(self) -> int:
        return self.layouts[-1].tokens

    def layout_for(self, num_tokens: int, num_chunks: int) -> MixedLayout | None:
        """The smallest captured layout that holds a step of num_tokens tokens in num_chunks
        chunks (None: no captured size does)."""
        for layout in self.layouts:
            if layout.tokens >= num_tokens:
                return layout if num_chunks <= layout.decode else None
        return None

    def _views(
        self, layout: MixedLayout
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
        """ids [T], positions [T], the attention metadata and the sampling rows [R], as views
        of the device buffer in `layout`."""
        o = layout.offsets
        b = self.buffer

        def part(name: str, size: int) -> torch.Tensor:
            return b[o[name] : o[name] + size]

        t, d, p, w, nb = layout.tokens, layout.decode, layout.chunks, layout.tiles, layout.blocks
        tiles = PrefillTiles(
            num_tiles=part("n_tiles", 1),
            tile_chunk=part("t_chunk", w),
            tile_start=part("t_start", w),
            chunk_row=part("c_row", p),
            chunk_len=part("c_len", p),
            chunk_ctx=part("c_ctx", p),
            block_tables=part("c_tab", p * nb).view(p, nb),
        )
        meta = AttentionMetadata(
            slot_mapping=part("slots", t),
            decode_rows=part("d_rows", d),
            decode_block_tables=part("d_tab", d * nb).view(d, nb),
            decode_context_lens=part("d_lens", d),
            prefills=[],
            prefill_tiles=tiles,
        )
        return part("ids", t), part("pos", t), meta, part("s_rows", layout.rows)

    def _forward(self, layout: MixedLayout) -> None:
        """The step of `layout` over the device buffer: logits and argmax of its sampling
        rows into the shared outputs."""
        ids, pos, meta, rows = self._views(layout)
        hidden = self.model(ids, pos, self.kv_caches, meta)
        logits = self.model.compute_logits(hidden[rows])  # [R, V]
        if self.logits is None:
            max_rows = self.tokens.shape[0]
            self.logits = torch.empty(
                (max_rows, logits.shape[1]), dtype=logits.dtype, device=self.device
            )
        n = layout.rows
        self.logits[:n].copy_(logits)
        self.tokens[:n].copy_(argmax(self.logits[:n]))

    @torch.inference_mode()
    def capture(self, pool: GraphPool | None = None) -> GraphPool | None:
        """Capture every size, largest first, in one memory pool (`pool`, or a new one);
        return the pool, for the decode graphs to share."""
        t0 = time.perf_counter()
        free_before, _ = torch.cuda.mem_get_info(self.device)
        for layout in reversed(self.layouts):
            self._fill(0, layout, [])  # every token padding: writes go to scratch
            self.buffer[: layout.total].copy_(self.staging.inputs[0][: layout.total])
            self._forward(layout)  # warm-up: compiles the kernels, settles the allocator
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, capture_error_mode=self.capture_error_mode):
                self._forward(layout)
            pool = graph.pool()
            self.graphs[layout.tokens] = graph
        torch.cuda.synchronize(self.device)
        free_after, _ = torch.cuda.mem_get_info(self.device)
        log.info(
            "captured %d mixed-step graphs (up to %d tokens) in %.2fs, %.0f MiB",
            len(self.layouts),
            self.max_tokens,
            time.perf_counter() - t0,
            (free_before - free_after) / MIB,
        )
        return pool

    def release(self) -> None:
        """Destroy the captured graphs (see DecodeGraphs.release: before the process group)."""
        if self.graphs:
            torch.cuda.synchronize(self.device)
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()

    def _fill(self, turn: int, layout: MixedLayout, chunks: Sequence[StepChunk],
              patch: TokenPatch | None = None) -> int:
        """Write a step's inputs into host buffer `turn` in `layout`; return its sampling
        rows. The decode rows whose input the step before sampled (`input_from`) get id 0
        here, and their rows and sources are added to `patch`."""
        h = self.staging.inputs_np[turn]
        o = layout.offsets
        bs, nb = self.block_size, layout.blocks
        ids = h[o["ids"] : o["ids"] + layout.tokens]
        pos = h[o["pos"] : o["pos"] + layout.tokens]
        slots = h[o["slots"] : o["slots"] + layout.tokens]
        c_row = h[o["c_row"] : o["c_row"] + layout.chunks]
        c_len = h[o["c_len"] : o["c_len"] + layout.chunks]
        c_ctx = h[o["c_ctx"] : o["c_ctx"] + layout.chunks]
        c_tab = h[o["c_tab"] : o["c_tab"] + layout.chunks * nb].reshape(layout.chunks, nb)
        # Decode rows (most of a step) are gathered into lists and written at the end, one
        # numpy call a field rather than one a row and field.
        d_rows: list[int] = []
        d_ids: list[int] = []
        d_lens: list[int] = []
        d_slots: list[int] = []
        tables, written = self._decode_tables, self._written
        width = 0  # the most blocks a decode row uses
        s_rows: list[int] = []
        t_chunk: list[int] = []
        t_start: list[int] = []
        row = npf = 0
        for chunk in chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_tokens
            end = start + n
            table = seq.block_table
            if n == 1:
                nd = len(d_rows)
                block = start // bs
                d_rows.append(row)
                if chunk.input_from is None:
                    d_ids.append(seq.token_ids[start])
                else:
                    d_ids.append(0)
                    assert patch is not None, "a token of the step before, and no step before"
                    patch.rows.append(row)
                    patch.sources.append(chunk.input_from)
                d_lens.append(end)
                d_slots.append(table[block] * bs + start - block * bs)
                if block >= width:
                    width = block + 1
                held, count = written[nd]
                if held is not table or len(table) > count:  # (most rows: neither, no call)
                    write_table_row(tables, written, nd, table)
            else:
                blocks = -(-end // bs)
                chunk_table = np.asarray(table[:blocks], dtype=np.int64)
                p = np.arange(start, end)
                ids[row : row + n] = seq.token_ids[start:end]
                pos[row : row + n] = p
                slots[row : row + n] = chunk_table[p // bs] * bs + p % bs
                c_row[npf], c_len[npf], c_ctx[npf] = row, n, end
                c_tab[npf, :blocks] = chunk_table
                for first in range(0, n, self.tile):
                    t_chunk.append(npf)
                    t_start.append(first)
                npf += 1
            row += n
            if chunk.samples:
                s_rows.append(row - 1)
        nd = len(d_rows)
        if nd:
            ids[d_rows] = d_ids
            slots[d_rows] = d_slots
            pos[d_rows] = d_lens
            pos[d_rows] -= 1
            h[o["d_rows"] : o["d_rows"] + nd] = d_rows
            h[o["d_lens"] : o["d_lens"] + nd] = d_lens
            d_tab = h[o["d_tab"] : o["d_tab"] + layout.decode * nb].reshape(layout.decode, nb)
            d_tab[:nd, :width] = tables[:nd, :width]
        ids[row:] = 0
        pos[row:] = 0
        slots[row:] = self.scratch_slot
        h[o["d_rows"] + nd : o["d_rows"] + layout.decode] = 0
        # a context of 0: the decode kernel skips the entry
        h[o["d_lens"] + nd : o["d_lens"] + layout.decode] = 0
        # Tiles and chunks past the real ones are left as they are: the prefill kernel reads
        # only the first n_tiles tiles, and through them only the real chunks.
        nw = len(t_chunk)
        h[o["n_tiles"]] = nw
        h[o["t_chunk"] : o["t_chunk"] + nw] = t_chunk
        h[o["t_start"] : o["t_start"] + nw] = t_start
        ns = len(s_rows)
        h[o["s_rows"] : o["s_rows"] + ns] = s_rows
        h[o["s_rows"] + ns : o["s_rows"] + layout.rows] = 0
        return ns

    def launch(self, chunks: Sequence[StepChunk], layout: MixedLayout,
               prev_tokens: torch.Tensor | None = None) -> GraphStep:
        """Queue one mixed step on the device in `layout` (layout_for) and return at once; the
        result's logits and tokens are those of the sampling chunks, in order (valid until the
        next launch). prev_tokens: the step before's sampled tokens on the device, where
        chunks take their first token from it (`input_from`)."""
        staging = self.staging
        turn = staging.next_turn()
        patch = TokenPatch([], [], prev_tokens) if prev_tokens is not None else None
        n = self._fill(turn, layout, chunks, patch)
        o = layout.offsets
        send_inputs(staging, turn, self.buffer, layout.total,
                    self.buffer[o["ids"] : o["ids"] + layout.tokens], patch)
        if self.replay:
            self.graphs[layout.tokens].replay()
        else:
            self._forward(layout)
        assert self.logits is not None
        tokens = self.tokens[:n]
        host_tokens, ready = staging.fetch(turn, n, tokens)
        return GraphStep(n, self.logits[:n], tokens, host_tokens, ready)
