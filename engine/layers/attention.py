"""Paged attention over a flat batch of decode tokens and prefill chunks.

Each layer's cache is a pair of tensors [num_blocks, block_size, kv_heads, head_dim]; token
position p of a sequence lives in block `block_table[p // block_size]`, offset
`p % block_size`. A step's batch concatenates every scheduled chunk's tokens; a chunk may start
mid-sequence (decode, later prefill chunks) and attends to everything cached before it.

Two implementations of one protocol (PagedAttention), chosen when the model is built
(`paged_attention`): TorchPagedAttention runs anywhere (CPU CI); TritonPagedAttention lays the
step out for the Triton kernels of engine.kernels.attention (the GPU path).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F


@dataclass
class ChunkSpec:
    """One sequence's part of the batch: tokens [start, start + num_tokens) of the sequence."""

    start: int
    num_tokens: int
    block_table: list[int]


@dataclass
class PrefillItem:
    """A chunk of more than one token, attended to on its own."""

    token_start: int  # first row of the chunk in the flat batch
    num_tokens: int
    context_len: int  # tokens it attends to: cached history plus itself
    block_ids: torch.Tensor  # [ceil(context_len / block_size)] long


@dataclass
class AttentionMetadata:
    """Where every token of a step goes in the cache, and what each chunk attends to."""

    slot_mapping: torch.Tensor  # [T] long: flat cache slot of each token's key/value
    decode_rows: torch.Tensor  # [Nd] long: batch rows of the one-token chunks
    decode_block_tables: torch.Tensor  # [Nd, max_blocks] long (padded with block 0)
    decode_context_lens: torch.Tensor  # [Nd] long
    prefills: list[PrefillItem]
    # Masks of multi-token chunks, built once per step and shared by the layers:
    # (chunk index, sliding window or 0) -> [num_tokens, context_len] bool.
    masks: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    # Multi-token chunks as an implementation lays them out for its own kernel (the Triton
    # implementation's PrefillTiles); None where `prefills` is used instead.
    prefill_tiles: Any = None


def chunk_slots(chunk: ChunkSpec, block_size: int) -> Iterator[int]:
    """The flat cache slot of each of the chunk's tokens (block id * block_size + offset)."""
    table = chunk.block_table
    return (
        table[p // block_size] * block_size + p % block_size
        for p in range(chunk.start, chunk.start + chunk.num_tokens)
    )


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k: torch.Tensor | None,
    v: torch.Tensor | None,
) -> None:
    """Store a step's keys and values at their cache slots. k = v = None: a fused kernel
    (engine.kernels.elementwise.rotary_and_cache_) has already stored them; nothing to do.

    caches: [num_blocks, block_size, Hkv, D]; slot_mapping: [T] long; k, v: [T, Hkv, D].
    """
    if k is None or v is None:
        assert k is None and v is None, "keys and values are written together"
        return
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


@dataclass
class StepLayout:
    """A step's chunks as rows of the flat batch: where each token's key/value goes, and for
    one-token (decode) and longer (prefill) chunks, their rows, lengths and block tables."""

    slots: list[int] = field(default_factory=list)  # [T] cache slot per token
    decode_rows: list[int] = field(default_factory=list)
    decode_lens: list[int] = field(default_factory=list)  # context length incl. the token
    decode_tables: list[list[int]] = field(default_factory=list)  # blocks in use, unpadded
    prefill_rows: list[int] = field(default_factory=list)  # first row of each chunk
    prefill_lens: list[int] = field(default_factory=list)  # tokens of each chunk
    prefill_ctx: list[int] = field(default_factory=list)  # cached history + the chunk
    prefill_tables: list[list[int]] = field(default_factory=list)


def layout_chunks(chunks: list[ChunkSpec], block_size: int) -> StepLayout:
    """Lay a step's chunks out as rows of the flat token batch (the attention
    implementations turn this into device tensors their own way)."""
    layout = StepLayout()
    row = 0
    for chunk in chunks:
        end = chunk.start + chunk.num_tokens
        table = chunk.block_table[: -(-end // block_size)]
        layout.slots.extend(chunk_slots(chunk, block_size))
        if chunk.num_tokens == 1:
            layout.decode_rows.append(row)
            layout.decode_lens.append(end)
            layout.decode_tables.append(table)
        else:
            layout.prefill_rows.append(row)
            layout.prefill_lens.append(chunk.num_tokens)
            layout.prefill_ctx.append(end)
            layout.prefill_tables.append(table)
        row += chunk.num_tokens
    return layout


class PagedAttention(Protocol):
    """What the model's attention layers call; the runner chooses the implementation.

    __call__(q, k, v, k_cache, v_cache, meta, scale, sliding_window) stores the step's keys
    and values k, v: [T, Hkv, D] at `meta.slot_mapping`, then returns the output [T, H, D] of
    q: [T, H, D]. k = v = None means they are already in the cache at those slots (written by
    a fused kernel such as engine.kernels.elementwise.rotary_and_cache_).
    """

    def build_metadata(
        self, chunks: list[ChunkSpec], block_size: int, device: torch.device
    ) -> AttentionMetadata: ...

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor: ...


class TorchPagedAttention:
    """Gathers each chunk's keys and values by block table and calls SDPA.

    One-token chunks (decode) are batched into a single call; longer chunks run one call each.
    Grouped-query attention folds the query heads that share a key/value head into the query
    length, so keys and values are never repeated.
    """

    def build_metadata(
        self, chunks: list[ChunkSpec], block_size: int, device: torch.device
    ) -> AttentionMetadata:
        layout = layout_chunks(chunks, block_size)
        slots, decode_rows = layout.slots, layout.decode_rows
        decode_tables, decode_lens = layout.decode_tables, layout.decode_lens
        prefills = [
            PrefillItem(row, n, ctx, torch.tensor(table, dtype=torch.long, device=device))
            for row, n, ctx, table in zip(
                layout.prefill_rows,
                layout.prefill_lens,
                layout.prefill_ctx,
                layout.prefill_tables,
                strict=True,
            )
        ]
        width = max((len(t) for t in decode_tables), default=0)
        padded = [t + [0] * (width - len(t)) for t in decode_tables]

        def long(values: list[int] | list[list[int]]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return AttentionMetadata(
            slot_mapping=long(slots),
            decode_rows=long(decode_rows),
            decode_block_tables=long(padded).reshape(len(padded), width),
            decode_context_lens=long(decode_lens),
            prefills=prefills,
        )

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D], or both None when already in the caches;
        caches: [num_blocks, block_size, Hkv, D].

        Writes k, v into the caches (unless None), then returns the attention output [T, H, D].
        """
        write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        out = torch.empty_like(q)
        if meta.decode_rows.numel():
            out[meta.decode_rows] = self._decode(q, k_cache, v_cache, meta, scale, sliding_window)
        for i, item in enumerate(meta.prefills):
            rows = slice(item.token_start, item.token_start + item.num_tokens)
            out[rows] = self._prefill(
                i, item, q[rows], k_cache, v_cache, meta, scale, sliding_window
            )
        return out

    @staticmethod
    def _decode(
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """Returns [Nd, H, D] for the one-token chunks."""
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        lens = meta.decode_context_lens  # [Nd]
        tables = meta.decode_block_tables  # [Nd, MB]
        n = tables.shape[0]
        keys = k_cache[tables].reshape(n, -1, num_kv_heads, head_dim)  # [Nd, S, Hkv, D]
        values = v_cache[tables].reshape(n, -1, num_kv_heads, head_dim)
        positions = torch.arange(keys.shape[1], device=q.device)  # [S]
        mask = positions.unsqueeze(0) < lens.unsqueeze(1)  # [Nd, S]
        if sliding_window:
            mask &= positions.unsqueeze(0) > (lens - 1 - sliding_window).unsqueeze(1)
        qd = q[meta.decode_rows].reshape(n, num_kv_heads, -1, head_dim)  # [Nd, Hkv, G, D]
        o = F.scaled_dot_product_attention(
            qd,
            keys.transpose(1, 2),
            values.transpose(1, 2),  # [Nd, Hkv, S, D]
            attn_mask=mask[:, None, None, :],
            scale=scale,
        )  # [Nd, Hkv, G, D]
        return o.reshape(n, -1, head_dim)

    @staticmethod
    def _prefill(
        index: int,
        item: PrefillItem,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """q: [n, H, D] of one chunk; returns [n, H, D]."""
        n, ctx = item.num_tokens, item.context_len
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        group = q.shape[1] // num_kv_heads
        keys = k_cache[item.block_ids].reshape(-1, num_kv_heads, head_dim)[:ctx]  # [C, Hkv, D]
        values = v_cache[item.block_ids].reshape(-1, num_kv_heads, head_dim)[:ctx]
        key = (index, sliding_window or 0)
        mask = meta.masks.get(key)
        if mask is None:
            q_pos = torch.arange(ctx - n, ctx, device=q.device).unsqueeze(1)  # [n, 1]
            k_pos = torch.arange(ctx, device=q.device).unsqueeze(0)  # [1, C]
            mask = k_pos <= q_pos
            if sliding_window:
                mask &= k_pos > q_pos - sliding_window
            mask = mask.repeat(group, 1)  # [G * n, C], row g * n + i is query i
            meta.masks[key] = mask
        # [n, Hkv, G, D] -> [1, Hkv, G * n, D] (4-D so that fused SDPA kernels apply on GPU)
        qg = q.reshape(n, num_kv_heads, group, head_dim).permute(1, 2, 0, 3)
        qg = qg.reshape(1, num_kv_heads, group * n, head_dim)
        o = F.scaled_dot_product_attention(
            qg,
            keys.transpose(0, 1).unsqueeze(0),
            values.transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            scale=scale,
        )  # [1, Hkv, G * n, D]
        o = o.reshape(num_kv_heads, group, n, head_dim).permute(2, 0, 1, 3)  # [n, Hkv, G, D]
        return o.reshape(n, -1, head_dim)


@dataclass
class PrefillTiles:
    """The multi-token chunks of a step, split into tiles of PREFILL_BLOCK_M query tokens
    (engine.kernels.attention)."""

    num_tiles: torch.Tensor  # [1] long: tiles of the step (a captured step has room for more)
    tile_chunk: torch.Tensor  # [W] long: the chunk of each tile
    tile_start: torch.Tensor  # [W] long: first query token of the tile within its chunk
    chunk_row: torch.Tensor  # [P] long: first row of each chunk in the flat batch
    chunk_len: torch.Tensor  # [P] long: query tokens of each chunk
    chunk_ctx: torch.Tensor  # [P] long: tokens each chunk attends to (history + itself)
    block_tables: torch.Tensor  # [P, max_blocks] long (padded with block 0)


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


class TritonPagedAttention:
    """PagedAttention with the Triton kernels of engine.kernels.attention (CUDA, or the CPU
    under TRITON_INTERPRET=1).

    Metadata: the decode fields as in TorchPagedAttention; multi-token chunks go into
    `meta.prefill_tiles` (and `meta.prefills` stays empty). All of a step's integers travel to
    the device in one copy.
    """

    def __init__(self) -> None:
        from engine.kernels import attention as kernels  # Triton: the GPU path only

        self.kernels = kernels
        # device -> the split decode's arrival counters (see _counters); shared by every
        # layer's launch, which the stream runs one after another.
        self.split_counters: dict[torch.device, torch.Tensor] = {}

    @property
    def prefill_tile(self) -> int:
        """Query tokens per prefill tile (PrefillTiles)."""
        tile: int = self.kernels.PREFILL_BLOCK_M
        return tile

    def build_metadata(
        self, chunks: list[ChunkSpec], block_size: int, device: torch.device
    ) -> AttentionMetadata:
        layout = layout_chunks(chunks, block_size)
        slots, decode_rows = layout.slots, layout.decode_rows
        decode_tables, decode_lens = layout.decode_tables, layout.decode_lens
        chunk_row, chunk_len = layout.prefill_rows, layout.prefill_lens
        chunk_ctx, chunk_tables = layout.prefill_ctx, layout.prefill_tables
        tile_chunk: list[int] = []
        tile_start: list[int] = []
        for index, num_tokens in enumerate(chunk_len):
            for start in range(0, num_tokens, self.kernels.PREFILL_BLOCK_M):
                tile_chunk.append(index)
                tile_start.append(start)
        d_width = max((len(t) for t in decode_tables), default=0)
        p_width = max((len(t) for t in chunk_tables), default=0)
        flat: list[int] = [*slots, *decode_rows, *decode_lens]
        for t in decode_tables:
            flat.extend(t)
            flat.extend([0] * (d_width - len(t)))
        flat += [len(tile_chunk), *tile_chunk, *tile_start, *chunk_row, *chunk_len, *chunk_ctx]
        for t in chunk_tables:
            flat.extend(t)
            flat.extend([0] * (p_width - len(t)))
        packed = _long(flat, device)
        sizes = [
            len(slots),
            len(decode_rows),
            len(decode_lens),
            len(decode_tables) * d_width,
            1,
            len(tile_chunk),
            len(tile_start),
            len(chunk_row),
            len(chunk_len),
            len(chunk_ctx),
            len(chunk_tables) * p_width,
        ]
        parts = packed.split(sizes)
        tiles = None
        if chunk_row:
            tiles = PrefillTiles(
                num_tiles=parts[4],
                tile_chunk=parts[5],
                tile_start=parts[6],
                chunk_row=parts[7],
                chunk_len=parts[8],
                chunk_ctx=parts[9],
                block_tables=parts[10].view(len(chunk_tables), p_width),
            )
        return AttentionMetadata(
            slot_mapping=parts[0],
            decode_rows=parts[1],
            decode_block_tables=parts[3].view(len(decode_tables), d_width),
            decode_context_lens=parts[2],
            prefills=[],
            prefill_tiles=tiles,
        )

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor | None,
        v: torch.Tensor | None,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, Hkv, D], or both None when already in the caches;
        caches: [num_blocks, block_size, Hkv, D].

        Writes k, v into the caches (unless None), then returns the attention output [T, H, D].
        """
        kernels = self.kernels
        write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        out = torch.empty_like(q)
        window = sliding_window or 0
        num_decode = meta.decode_rows.shape[0]
        if num_decode:
            num_kv_heads = k_cache.shape[2]
            splits = kernels.decode_splits(num_decode, num_kv_heads)
            # Fetched even when unused: the first decode launch, a warm-up outside any CUDA
            # graph, allocates them.
            counters = self._counters(q.device, num_decode * num_kv_heads if splits > 1 else 0)
            kernels.decode_attention(
                q, k_cache, v_cache, out, meta.decode_rows, meta.decode_block_tables,
                meta.decode_context_lens, counters, scale, window,
            )  # fmt: skip
        tiles = meta.prefill_tiles
        if tiles is not None:
            kernels.prefill_attention(
                q, k_cache, v_cache, out, tiles.num_tiles, tiles.tile_chunk, tiles.tile_start,
                tiles.chunk_row,
                tiles.chunk_len, tiles.chunk_ctx, tiles.block_tables, scale, window,
            )  # fmt: skip
        return out

    def _counters(self, device: torch.device, need: int) -> torch.Tensor:
        """At least `need` int32 arrival counters for the split decode on this device, all zero
        between launches (each launch's last part per (sequence, key/value head) resets its
        own), so neither a launch nor a graph replay needs a memset.

        Allocated and zeroed on the first decode launch, replaced only when one needs more,
        which must not happen inside a CUDA graph capture: the capture runs a warm-up outside
        the graph first, and the first allocation already holds SPLIT_TARGET counters, more
        than any batch that splits (num_decode * num_kv_heads * 2 <= SPLIT_TARGET) uses.
        """
        counters = self.split_counters.get(device)
        if counters is None or counters.numel() < need:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("split-decode counters must be allocated before capture")
            size = max(need, self.kernels.SPLIT_TARGET)
            counters = torch.zeros(size, dtype=torch.int32, device=device)
            self.split_counters[device] = counters
        return counters


def paged_attention(triton: bool) -> PagedAttention:
    """The implementation a model's attention layers run: the Triton kernels when `triton`
    (a GPU, no enforce_eager), else plain PyTorch."""
    return TritonPagedAttention() if triton else TorchPagedAttention()
