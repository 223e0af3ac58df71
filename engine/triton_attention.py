"""Paged attention in Triton: the GPU implementation of engine.attention.PagedAttention.

Two kernels read keys and values straight from the paged cache through the block tables, with
an online softmax, so nothing is gathered or padded:

- decode: one program per (one-token chunk, key/value head). The query heads of the GQA group
  that share the key/value head are the rows of one tile, so each key/value tile is read once
  for the whole group. Shapes are fixed by the batch size (context lengths and block tables
  are device tensors), so a decode step can be captured in a CUDA graph.
- prefill: one program per (tile of BLOCK_M query tokens of a chunk, query head), over the
  chunk's history plus itself, causally masked. Every multi-token chunk of the step runs in the
  same launch (varlen), whether or not it has cached history.

The step's new keys and values are in the cache before the kernels run: written here with
index_copy_, or already by engine.triton_layers.rotary_and_cache_ (k = v = None). Both kernels
run in Triton's interpreter on the CPU (TRITON_INTERPRET=1), which is how CI checks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.attention import AttentionMetadata, ChunkSpec, layout_chunks, write_kv

# Key/value positions per tile of the loop (several cache blocks when block_size is small).
DECODE_BLOCK_N = 64
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
# Decode programs (sequence x key/value head x split) aimed at: about one wave of the GPU's
# multiprocessors; contexts are split in up to MAX_SPLITS parts to get there.
SPLIT_TARGET = 128
MAX_SPLITS = 8
# tl.dot needs at least 16 rows: the GQA group is padded up to this.
MIN_DOT_ROWS = 16
_LOG2E = 1.4426950408889634


@dataclass
class PrefillTiles:
    """The multi-token chunks of a step, split into tiles of PREFILL_BLOCK_M query tokens."""

    tile_chunk: torch.Tensor  # [W] long: the chunk of each tile
    tile_start: torch.Tensor  # [W] long: first query token of the tile within its chunk
    chunk_row: torch.Tensor  # [P] long: first row of each chunk in the flat batch
    chunk_len: torch.Tensor  # [P] long: query tokens of each chunk
    chunk_ctx: torch.Tensor  # [P] long: tokens each chunk attends to (history + itself)
    block_tables: torch.Tensor  # [P, max_blocks] long (padded with block 0)


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    rows_ptr,
    tables_ptr,
    lens_ptr,
    scale_log2,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_table,
    stride_slot,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLITS: tl.constexpr,
    part_o_ptr,
    part_lse_ptr,
):
    i = tl.program_id(0)  # which one-token chunk
    kvh = tl.program_id(1)  # which key/value head
    split = tl.program_id(2)  # which part of the context (SPLITS > 1: flash-decoding)
    row = tl.load(rows_ptr + i)
    ctx = tl.load(lens_ptr + i)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    qmask = (g < GROUP)[:, None] & dmask[None, :]
    heads = kvh * GROUP + g
    q = tl.load(
        q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :], mask=qmask, other=0.0
    )  # [BLOCK_G, BLOCK_D]
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    hi = ctx
    if SPLITS > 1:
        part = tl.cdiv(tl.cdiv(ctx - lo, SPLITS), BLOCK_N) * BLOCK_N
        lo = lo + split * part
        hi = tl.minimum(ctx, lo + part)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        valid = pos < hi
        block = tl.load(tables_ptr + i * stride_table + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        offs = slot[:, None] * stride_slot + kvh * HEAD_DIM + d[None, :]
        kvmask = valid[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kvmask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = (
            tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
        )  # [BLOCK_G, BLOCK_N], log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        s_sum = s_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offs, mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    if SPLITS > 1:  # this part's normalised output and log2-sum-exp, combined below
        lse = tl.where(s_sum == 0.0, float("-inf"), m + tl.log2(s_sum))
        o = acc / tl.where(s_sum == 0.0, 1.0, s_sum)[:, None]
        base = (i * tl.num_programs(1) + kvh) * SPLITS + split
        tl.store(part_lse_ptr + base * BLOCK_G + g, lse)
        tl.store(part_o_ptr + (base * BLOCK_G + g[:, None]) * BLOCK_D + d[None, :], o)
    else:
        s_sum = tl.where(s_sum == 0.0, 1.0, s_sum)
        o = acc / s_sum[:, None]
        tl.store(
            out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
            o.to(out_ptr.dtype.element_ty),
            mask=qmask,
        )


@triton.jit
def _combine_kernel(
    out_ptr,
    rows_ptr,
    part_o_ptr,
    part_lse_ptr,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
):
    i = tl.program_id(0)
    kvh = tl.program_id(1)
    row = tl.load(rows_ptr + i)
    sp = tl.arange(0, SPLITS)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, BLOCK_D)
    base = (i * tl.num_programs(1) + kvh) * SPLITS + sp  # [S]
    lse = tl.load(part_lse_ptr + base[:, None] * BLOCK_G + g[None, :])  # [S, BLOCK_G]
    top = tl.max(lse, 0)  # [BLOCK_G]; split 0 is never empty
    w = tl.exp2(lse - top[None, :])  # [S, BLOCK_G]
    o = tl.load(
        part_o_ptr + (base[:, None, None] * BLOCK_G + g[None, :, None]) * BLOCK_D + d[None, None, :]
    )  # [S, BLOCK_G, BLOCK_D]
    o = tl.sum(o * w[:, :, None], 0) / tl.sum(w, 0)[:, None]
    heads = kvh * GROUP + g
    mask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
    tl.store(
        out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    tile_chunk_ptr,
    tile_start_ptr,
    chunk_row_ptr,
    chunk_len_ptr,
    chunk_ctx_ptr,
    tables_ptr,
    scale_log2,
    window,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_table,
    stride_slot,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    w = tl.program_id(0)  # which tile of query tokens
    head = tl.program_id(1)  # which query head
    kvh = head // GROUP
    c = tl.load(tile_chunk_ptr + w)
    m0 = tl.load(tile_start_ptr + w)
    row0 = tl.load(chunk_row_ptr + c)
    n = tl.load(chunk_len_ptr + c)
    ctx = tl.load(chunk_ctx_ptr + c)
    mi = m0 + tl.arange(0, BLOCK_M)
    qvalid = mi < n
    qpos = ctx - n + mi  # absolute positions of the queries
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    q = tl.load(
        q_ptr + (row0 + mi)[:, None] * stride_qt + head * stride_qh + d[None, :],
        mask=qvalid[:, None] & dmask[None, :],
        other=0.0,
    )  # [BLOCK_M, BLOCK_D]
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = tl.minimum(ctx, ctx - n + m0 + BLOCK_M)  # one past the tile's last query
    lo = tl.where(window > 0, tl.maximum(ctx - n + m0 - window + 1, 0), 0)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        valid = pos < hi
        block = tl.load(tables_ptr + c * stride_table + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        offs = slot[:, None] * stride_slot + kvh * HEAD_DIM + d[None, :]
        kvmask = valid[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kvmask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
        allowed = valid[None, :] & (pos[None, :] <= qpos[:, None])
        if window > 0:
            allowed &= pos[None, :] > qpos[:, None] - window
        s = tl.where(allowed, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing seen yet
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        s_sum = s_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offs, mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    s_sum = tl.where(s_sum == 0.0, 1.0, s_sum)
    o = acc / s_sum[:, None]
    tl.store(
        out_ptr + (row0 + mi)[:, None] * stride_ot + head * stride_oh + d[None, :],
        o.to(out_ptr.dtype.element_ty),
        mask=qvalid[:, None] & dmask[None, :],
    )


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


class TritonPagedAttention:
    """engine.attention.PagedAttention with the Triton kernels above (CUDA, or the CPU under
    TRITON_INTERPRET=1).

    Metadata: the decode fields as in TorchPagedAttention; multi-token chunks go into
    `meta.prefill_tiles` (and `meta.prefills` stays empty). All of a step's integers travel to
    the device in one copy.
    """

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
            for start in range(0, num_tokens, PREFILL_BLOCK_M):
                tile_chunk.append(index)
                tile_start.append(start)
        d_width = max((len(t) for t in decode_tables), default=0)
        p_width = max((len(t) for t in chunk_tables), default=0)
        flat: list[int] = [*slots, *decode_rows, *decode_lens]
        for t in decode_tables:
            flat.extend(t)
            flat.extend([0] * (d_width - len(t)))
        flat += [*tile_chunk, *tile_start, *chunk_row, *chunk_len, *chunk_ctx]
        for t in chunk_tables:
            flat.extend(t)
            flat.extend([0] * (p_width - len(t)))
        packed = _long(flat, device)
        sizes = [
            len(slots),
            len(decode_rows),
            len(decode_lens),
            len(decode_tables) * d_width,
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
                tile_chunk=parts[4],
                tile_start=parts[5],
                chunk_row=parts[6],
                chunk_len=parts[7],
                chunk_ctx=parts[8],
                block_tables=parts[9].view(len(chunk_tables), p_width),
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
        num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
        block_size = k_cache.shape[1]
        write_kv(k_cache, v_cache, meta.slot_mapping, k, v)
        out = torch.empty_like(q)
        group = q.shape[1] // num_kv_heads
        block_d = triton.next_power_of_2(head_dim)
        window = sliding_window or 0
        slot_stride = num_kv_heads * head_dim  # the caches are contiguous
        scale_log2 = scale * _LOG2E
        # float32 models (tests) keep full precision; tf32 would round their inputs.
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        num_decode = meta.decode_rows.shape[0]
        if num_decode:
            tables = meta.decode_block_tables
            block_g = max(MIN_DOT_ROWS, triton.next_power_of_2(group))
            # Few (sequence, head) programs leave most of the GPU idle on a long context:
            # split each context into parts and combine them (a static choice per batch size,
            # so captured graphs keep it).
            splits = 1
            while splits < MAX_SPLITS and num_decode * num_kv_heads * splits * 2 <= SPLIT_TARGET:
                splits *= 2
            if splits > 1:
                part_o = torch.empty(
                    (num_decode, num_kv_heads, splits, block_g, block_d),
                    dtype=torch.float32, device=q.device,
                )  # fmt: skip
                part_lse = torch.empty(
                    (num_decode, num_kv_heads, splits, block_g), dtype=torch.float32,
                    device=q.device,
                )  # fmt: skip
            else:
                part_o = part_lse = out  # unused
            _decode_kernel[(num_decode, num_kv_heads, splits)](
                q, k_cache, v_cache, out, meta.decode_rows, tables, meta.decode_context_lens,
                scale_log2, window, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                tables.stride(0), slot_stride,
                BLOCK_SIZE=block_size, GROUP=group, BLOCK_G=block_g,
                HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_N=DECODE_BLOCK_N, PRECISION=precision,
                SPLITS=splits, part_o_ptr=part_o, part_lse_ptr=part_lse,
            )  # fmt: skip
            if splits > 1:
                _combine_kernel[(num_decode, num_kv_heads)](
                    out, meta.decode_rows, part_o, part_lse, out.stride(0), out.stride(1),
                    GROUP=group, BLOCK_G=block_g, HEAD_DIM=head_dim, BLOCK_D=block_d,
                    SPLITS=splits,
                )  # fmt: skip
        tiles = meta.prefill_tiles
        if tiles is not None:
            _prefill_kernel[(tiles.tile_chunk.shape[0], q.shape[1])](
                q, k_cache, v_cache, out, tiles.tile_chunk, tiles.tile_start, tiles.chunk_row,
                tiles.chunk_len, tiles.chunk_ctx, tiles.block_tables, scale_log2, window,
                q.stride(0), q.stride(1), out.stride(0), out.stride(1),
                tiles.block_tables.stride(0), slot_stride,
                BLOCK_SIZE=block_size, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d,
                BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=PREFILL_BLOCK_N, PRECISION=precision,
            )  # fmt: skip
        return out
