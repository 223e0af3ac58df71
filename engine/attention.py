"""Paged attention over a flat batch of decode tokens and prefill chunks, in plain PyTorch.

Each layer's cache is a pair of tensors [num_blocks, block_size, kv_heads, head_dim]; token
position p of a sequence lives in block `block_table[p // block_size]`, offset
`p % block_size`. A step's batch concatenates every scheduled chunk's tokens; a chunk may start
mid-sequence (decode, later prefill chunks) and attends to everything cached before it.

The runner picks an attention implementation object; this one runs anywhere (CPU CI). A faster
GPU kernel plugs in by providing the same two methods.
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
    (engine.triton_layers.rotary_and_cache_) has already stored them; nothing to do.

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
    a fused kernel such as engine.triton_layers.rotary_and_cache_).
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
