"""Paged attention in Triton: the kernels behind engine.layers.attention.TritonPagedAttention,
launched on plain tensors (the layer builds them from its step metadata).

Two kernels read keys and values straight from the paged cache through the block tables, with
an online softmax, so nothing is gathered or padded:

- decode: one program per (one-token chunk, key/value head). The query heads of the GQA group
  that share the key/value head are the rows of one tile, so each key/value tile is read once
  for the whole group. Shapes are fixed by the batch size (context lengths and block tables
  are device tensors), so a decode step can be captured in a CUDA graph. At small batch a
  long context is split into parts (flash-decoding), as many as its length needs: each part
  stores a partial result and counts itself in with an atomic, and the last to arrive merges
  them, so one launch does it all.
- prefill: tiles of BLOCK_M query tokens of a chunk, each over the chunk's history plus
  itself, causally masked, one query head per program. Every multi-token chunk of the step runs
  in the same launch (varlen), whether or not it has cached history. The programs walk the
  step's tiles, whose count they read from the device: a captured mixed step has room for
  every tile its size could need (a tile per 64 tokens plus one per possible chunk, 198 at 384
  tokens) and typically uses a few, and an idle program per spare tile and head cost a small
  step more than its real attention did.

The step's new keys and values are in the cache before the kernels run (the layer writes them,
or engine.kernels.elementwise.rotary_and_cache_ already has). Both kernels
run in Triton's interpreter on the CPU (TRITON_INTERPRET=1), which is how CI checks them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.pdl import allow_next_then_wait

# Key/value positions per tile of the loop (several cache blocks when block_size is small);
# default_decode_config picks the decode kernel's per batch.
DECODE_BLOCK_N = 64
PREFILL_BLOCK_M = 64
PREFILL_BLOCK_N = 64
# Prefill programs per query head beyond one per BLOCK_M tokens of the step: enough that a step
# of a few chunks gives each program one tile at most; a step of many short chunks has more
# tiles than programs, and its programs take several each.
PREFILL_SPARE_PROGRAMS = 16
# Decode programs (sequence x key/value head x split) aimed at: about one wave of the GPU's
# multiprocessors; contexts are split in up to MAX_SPLITS parts to get there.
SPLIT_TARGET = 128
MAX_SPLITS = 8
# A context uses only as many parts as give each at least this many keys (one tile): at batch
# 1 the kernel is all latency, one dependent load chain per tile, so more parts of one tile
# each beat fewer longer ones; the combine costs one partial's store and load per part.
MIN_SPLIT_TOKENS = 64
# tl.dot needs at least 16 rows: the GQA group is padded up to this.
MIN_DOT_ROWS = 16
_LOG2E = 1.4426950408889634


@triton.jit
def _attend(
    q,
    k_cache_ptr,
    v_cache_ptr,
    table_ptr,
    kvh,
    lo,
    hi,
    scale_log2,
    stride_slot,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # q: [BLOCK_G, BLOCK_D] over key positions [lo, hi) of one sequence's block table, with an
    # online softmax -> unnormalised output [BLOCK_G, BLOCK_D], row sums and maxima [BLOCK_G]
    # (log2 units).
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    m = tl.full([BLOCK_G], float("-inf"), tl.float32)
    s_sum = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    for n0 in range(lo, hi, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        valid = pos < hi
        block = tl.load(table_ptr + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        offs = slot[:, None] * stride_slot + kvh * HEAD_DIM + d[None, :]
        kvmask = valid[:, None] & dmask[None, :]
        k = tl.load(k_cache_ptr + offs, mask=kvmask, other=0.0)  # [BLOCK_N, BLOCK_D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2  # [BLOCK_G, BLOCK_N]
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        s_sum = s_sum * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + offs, mask=kvmask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    return acc, s_sum, m


@triton.jit
def _combine(
    part_o_ptr,
    part_lse_ptr,
    part0,
    active,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    SPLITS: tl.constexpr,
):
    # The `active` partials from part0 on (rows [GROUP, HEAD_DIM] each) -> the output
    # [GROUP_P2, BLOCK_D] (rows past GROUP are zero). Loaded through L2 (".cg"): the other
    # programs wrote them, and a stale L1 line must not be read.
    sp = tl.arange(0, SPLITS)
    g = tl.arange(0, GROUP_P2)
    d = tl.arange(0, BLOCK_D)
    gmask = g < GROUP
    idx = part0 + sp  # [S]
    lmask = (sp < active)[:, None] & gmask[None, :]  # [S, GROUP_P2]
    lse = tl.load(
        part_lse_ptr + idx[:, None] * GROUP + g[None, :],
        mask=lmask, other=float("-inf"), cache_modifier=".cg",
    )  # fmt: skip
    top = tl.where(gmask, tl.max(lse, 0), 0.0)  # [GROUP_P2]; padding rows have no parts
    w = tl.exp2(lse - top[None, :])  # [S, GROUP_P2]
    offs = (idx[:, None, None] * GROUP + g[None, :, None]) * HEAD_DIM + d[None, None, :]
    omask = lmask[:, :, None] & (d < HEAD_DIM)[None, None, :]
    o = tl.load(part_o_ptr + offs, mask=omask, other=0.0, cache_modifier=".cg")  # [S, G, D]
    total = tl.where(gmask, tl.sum(w, 0), 1.0)
    return tl.sum(o * w[:, :, None], 0) / total[:, None]


@triton.jit
def _decode_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    rows_ptr,
    tables_ptr,
    lens_ptr,
    counters_ptr,
    part_o_ptr,
    part_lse_ptr,
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
    GROUP_P2: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PRECISION: tl.constexpr,
    SPLITS: tl.constexpr,
    MIN_SPLIT: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_next_then_wait(USE_PDL)  # engine.kernels.pdl
    i = tl.program_id(0)  # which one-token chunk
    kvh = tl.program_id(1)  # which key/value head
    split = tl.program_id(2)  # which part of the context (SPLITS > 1: flash-decoding)
    seq_head = i * tl.num_programs(1) + kvh
    row = tl.load(rows_ptr + i)
    ctx = tl.load(lens_ptr + i)
    lo = tl.where(window > 0, tl.maximum(ctx - window, 0), 0)
    part_len = ctx - lo
    # Parts this context uses: as many as its length needs, at most SPLITS. (A constant 1
    # without splits, so the partial/combine branch below is not even compiled then.)
    active = 1
    if SPLITS > 1:
        # (A padding entry's context of 0 still divides by at least one tile.)
        wanted = tl.minimum(SPLITS, tl.cdiv(tl.maximum(part_len, 1), MIN_SPLIT))
        part_len = tl.cdiv(tl.cdiv(tl.maximum(part_len, 1), wanted), BLOCK_N) * BLOCK_N
        active = tl.cdiv(ctx - lo, part_len)  # rounding up to tiles may leave the last idle
    # A context of 0 is a padding entry of a captured mixed step (engine.executor.
    # mixed_graphs): its row belongs to another chunk, so it stores nothing.
    if (split < active) & (ctx > 0):
        lo = lo + split * part_len
        hi = tl.minimum(ctx, lo + part_len)
        g = tl.arange(0, BLOCK_G)
        d = tl.arange(0, BLOCK_D)
        heads = kvh * GROUP + g
        qmask = (g < GROUP)[:, None] & (d < HEAD_DIM)[None, :]
        q = tl.load(
            q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
            mask=qmask,
            other=0.0,
        )  # [BLOCK_G, BLOCK_D]
        acc, s_sum, m = _attend(
            q, k_cache_ptr, v_cache_ptr, tables_ptr + i * stride_table, kvh, lo, hi, scale_log2,
            stride_slot, BLOCK_SIZE, HEAD_DIM, BLOCK_G, BLOCK_D, BLOCK_N, PRECISION,
        )  # fmt: skip
        s_sum = tl.where(s_sum == 0.0, 1.0, s_sum)  # padding rows of the group saw nothing
        o = acc / s_sum[:, None]
        if active == 1:
            tl.store(
                out_ptr + row * stride_ot + heads[:, None] * stride_oh + d[None, :],
                o.to(out_ptr.dtype.element_ty),
                mask=qmask,
            )
        else:  # store this part, and the last part to finish combines them all
            part0 = seq_head * SPLITS  # this (sequence, head)'s first partial
            lse = m + tl.log2(s_sum)
            tl.store(part_lse_ptr + (part0 + split) * GROUP + g, lse, mask=g < GROUP)
            tl.store(
                part_o_ptr + ((part0 + split) * GROUP + g[:, None]) * HEAD_DIM + d[None, :],
                o,
                mask=qmask,
            )
            # Every thread's stores issued before the release; the acquire of the last part
            # to arrive then sees all the others' partials.
            tl.debug_barrier()
            done = tl.atomic_add(counters_ptr + seq_head, 1, sem="acq_rel")
            if done == active - 1:
                merged = _combine(
                    part_o_ptr, part_lse_ptr, part0, active, GROUP, GROUP_P2, HEAD_DIM, BLOCK_D,
                    SPLITS,
                )  # fmt: skip
                gc = tl.arange(0, GROUP_P2)
                tl.store(
                    out_ptr + row * stride_ot + (kvh * GROUP + gc)[:, None] * stride_oh
                    + d[None, :],
                    merged.to(out_ptr.dtype.element_ty),
                    mask=(gc < GROUP)[:, None] & (d < HEAD_DIM)[None, :],
                )  # fmt: skip
                tl.store(counters_ptr + seq_head, 0)  # zero again for the next launch


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    num_tiles_ptr,
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
    head = tl.program_id(1)  # which query head
    kvh = head // GROUP
    d = tl.arange(0, BLOCK_D)
    dmask = d < HEAD_DIM
    num_tiles = tl.load(num_tiles_ptr)
    # Tiles first, first + programs, ...: the step's real ones only (see the module docstring).
    for w in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
        c = tl.load(tile_chunk_ptr + w)
        m0 = tl.load(tile_start_ptr + w)
        row0 = tl.load(chunk_row_ptr + c)
        n = tl.load(chunk_len_ptr + c)
        ctx = tl.load(chunk_ctx_ptr + c)
        mi = m0 + tl.arange(0, BLOCK_M)
        qvalid = mi < n
        qpos = ctx - n + mi  # absolute positions of the queries
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
            block = tl.load(
                tables_ptr + c * stride_table + pos // BLOCK_SIZE, mask=valid, other=0
            )
            slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
            offs = slot[:, None] * stride_slot + kvh * HEAD_DIM + d[None, :]
            kvmask = valid[:, None] & dmask[None, :]
            k = tl.load(k_cache_ptr + offs, mask=kvmask, other=0.0)  # [BLOCK_N, BLOCK_D]
            # [BLOCK_M, BLOCK_N]
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale_log2
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


def prefill_programs(num_tokens: int) -> int:
    """Prefill programs per query head for a step of num_tokens rows (at most; never more than
    the tiles it has room for): one per PREFILL_BLOCK_M rows plus PREFILL_SPARE_PROGRAMS."""
    return -(-num_tokens // PREFILL_BLOCK_M) + PREFILL_SPARE_PROGRAMS


@dataclass(frozen=True)
class DecodeConfig:
    """The decode kernel's tile and launch choices (bench/bench_attention.py sweeps them; the
    engine's own per batch come from default_decode_config)."""

    block_n: int = DECODE_BLOCK_N
    num_warps: int = 4
    num_stages: int = 3
    split_target: int = SPLIT_TARGET
    min_split: int = MIN_SPLIT_TOKENS


@functools.cache  # called per layer of every eager step: one lookup, not a new object
def default_decode_config(num_decode: int, num_kv_heads: int) -> DecodeConfig:
    """The decode launch's choices, measured on an H200 (bench/bench_attention.py, CUDA
    graphs; two pipeline stages throughout):

    - split contexts (small batches; W-latency): a program takes about one tile, so tiles of
      64 keys and two warps, whose fewer threads start sooner (8b over two GPUs at batch 1,
      context 256: 6.4 us against 7.1 for 64 keys, four warps and three stages; 1b 5.5
      against 5.9);
    - whole contexts (larger batches): each program walks every tile of its context, so tiles
      of 128 keys, half the dependent steps, with four warps (1b at 65 sequences of 100-600
      keys: 20.8 against 24.6 us; at 256: 61.4 against 62.9).
    """
    if decode_splits(num_decode, num_kv_heads) > 1:
        return DecodeConfig(block_n=64, num_warps=2, num_stages=2)
    return DecodeConfig(block_n=128, num_warps=4, num_stages=2)


def decode_splits(num_decode: int, num_kv_heads: int, split_target: int = SPLIT_TARGET) -> int:
    """The parts a decode launch may split each context into: few (sequence, head) programs
    leave most of the GPU idle on a long context, so each context may take up to this many
    (a static choice per batch size, so captured graphs keep it); the kernel uses as many as
    the context's length needs."""
    splits = 1
    while splits < MAX_SPLITS and num_decode * num_kv_heads * splits * 2 <= split_target:
        splits *= 2
    return splits


def _precision(q: torch.Tensor) -> str:
    # float32 models (tests) keep full precision; tf32 would round their inputs.
    return "ieee" if q.dtype == torch.float32 else "tf32"


def decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    rows: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    counters: torch.Tensor,
    scale: float,
    sliding_window: int,
    config: DecodeConfig | None = None,
) -> None:
    """The one-token chunks' rows of out: [T, H, D], in one launch.

    q: [T, H, D]; caches: [num_blocks, block_size, Hkv, D] contiguous, the step's keys and
    values already in them; rows: [Nd] long, the batch rows of the one-token chunks;
    block_tables: [Nd, max_blocks] long; context_lens: [Nd] long; counters: int32 arrival
    counters, all zero, at least Nd * Hkv of them when decode_splits(Nd, Hkv) > 1 (each launch
    leaves them zero again); sliding_window: 0 for full attention.
    """
    num_decode = rows.shape[0]
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    cfg = config or default_decode_config(num_decode, num_kv_heads)
    group = q.shape[1] // num_kv_heads
    splits = decode_splits(num_decode, num_kv_heads, cfg.split_target)
    part_o = part_lse = out  # unused without splits
    if splits > 1:
        part_o = torch.empty(
            (num_decode, num_kv_heads, splits, group, head_dim),
            dtype=torch.float32, device=q.device,
        )  # fmt: skip
        part_lse = torch.empty(
            (num_decode, num_kv_heads, splits, group), dtype=torch.float32, device=q.device
        )
    _decode_kernel[(num_decode, num_kv_heads, splits)](
        q, k_cache, v_cache, out, rows, block_tables, context_lens,
        counters, part_o, part_lse, scale * _LOG2E, sliding_window, q.stride(0), q.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), num_kv_heads * head_dim,
        BLOCK_SIZE=k_cache.shape[1], GROUP=group, GROUP_P2=triton.next_power_of_2(group),
        BLOCK_G=max(MIN_DOT_ROWS, triton.next_power_of_2(group)), HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=cfg.block_n,
        PRECISION=_precision(q), SPLITS=splits, MIN_SPLIT=cfg.min_split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl.launch_options(q.device),
    )  # fmt: skip


def prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out: torch.Tensor,
    num_tiles: torch.Tensor,
    tile_chunk: torch.Tensor,
    tile_start: torch.Tensor,
    chunk_row: torch.Tensor,
    chunk_len: torch.Tensor,
    chunk_ctx: torch.Tensor,
    block_tables: torch.Tensor,
    scale: float,
    sliding_window: int,
) -> None:
    """The multi-token chunks' rows of out: [T, H, D], every chunk in one launch.

    The chunks are cut into tiles of PREFILL_BLOCK_M query tokens: num_tiles: [1] long, how
    many there are (the first num_tiles entries of tile_chunk and tile_start are read; a
    captured step's arrays are longer); tile_chunk, tile_start: [W] long, each tile's chunk and
    first query token within it; chunk_row, chunk_len, chunk_ctx: [P] long, each chunk's first
    row in the batch, query tokens, and tokens attended to (history + itself); block_tables:
    [P, max_blocks] long. q, caches and sliding_window as in decode_attention.
    """
    num_kv_heads, head_dim = k_cache.shape[2], k_cache.shape[3]
    programs = min(tile_chunk.shape[0], prefill_programs(q.shape[0]))
    _prefill_kernel[(max(programs, 1), q.shape[1])](
        q, k_cache, v_cache, out, num_tiles, tile_chunk, tile_start, chunk_row,
        chunk_len, chunk_ctx, block_tables, scale * _LOG2E, sliding_window,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        block_tables.stride(0), num_kv_heads * head_dim,
        BLOCK_SIZE=k_cache.shape[1], GROUP=q.shape[1] // num_kv_heads, HEAD_DIM=head_dim,
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_M=PREFILL_BLOCK_M,
        BLOCK_N=PREFILL_BLOCK_N, PRECISION=_precision(q),
    )  # fmt: skip
