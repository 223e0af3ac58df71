"""Fused elementwise layers in Triton for the GPU path: residual add + RMSNorm, rotary embedding
(queries in place, keys into the KV cache together with the values, in one kernel),
SiLU(gate) * up. Each replaces several PyTorch kernels
with one; at small batch a decode step is mostly kernel launches and their tails, so the count
matters even inside a CUDA graph. They round where the PyTorch layers round (the sum to the
model dtype, the normalised value before the weight). The layers' PyTorch code stays the CPU
path; these also run in Triton's interpreter (TRITON_INTERPRET=1), which is how CI checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.pdl import allow_next_then_wait

SILU_BLOCK = 1024


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    res_out_ptr,
    stride_x,
    stride_res,
    n,
    eps,
    HAS_RES: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_next_then_wait(USE_PDL)  # engine.kernels.pdl
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        s = (x + r).to(res_out_ptr.dtype.element_ty)  # the residual stream, model dtype
        tl.store(res_out_ptr + row * n + cols, s, mask=mask)
        x = s.to(tl.float32)
    var = tl.sum(x * x, axis=0) / n
    y = (x * tl.rsqrt(var + eps)).to(out_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * n + cols, (y.to(tl.float32) * w.to(tl.float32)), mask=mask)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """x, residual: [T, D] -> (weight * norm(x + residual), x + residual) (None without one)."""
    t, n = x.shape
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    res_out = torch.empty_like(out) if residual is not None else None
    if t:
        _rms_norm_kernel[(t,)](
            x, residual if residual is not None else x, weight, out,
            res_out if res_out is not None else out, x.stride(0),
            residual.stride(0) if residual is not None else 0, n, eps,
            HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(n),
            **pdl.launch_options(x.device),
        )  # fmt: skip
    return out, res_out


@triton.jit
def _rotate_heads(src_ptr, dst_ptr, src_offs, dst_offs, mask, cos, sin, HALF: tl.constexpr):
    # offs: [BLOCK_H, BLOCK_HALF] first half of each head; cos, sin: [1, BLOCK_HALF].
    # Rotated in float32 from the float32 tables, rounded once to the destination's dtype.
    x1 = tl.load(src_ptr + src_offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + src_offs + HALF, mask=mask, other=0.0).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(dst_ptr.dtype.element_ty)
    y2 = (x2 * cos + x1 * sin).to(dst_ptr.dtype.element_ty)
    tl.store(dst_ptr + dst_offs, y1, mask=mask)
    tl.store(dst_ptr + dst_offs + HALF, y2, mask=mask)


@triton.jit
def _cos_sin(
    pos_ptr, cos_ptr, sin_ptr, t, stride_table, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr
):
    # -> cos, sin: [1, BLOCK_HALF] at token t's position (the tables' halves are equal)
    pos = tl.load(pos_ptr + t)
    i = tl.arange(0, BLOCK_HALF)
    imask = i < HALF
    cos = tl.load(cos_ptr + pos * stride_table + i, mask=imask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_table + i, mask=imask, other=0.0)[None, :]
    return cos, sin


@triton.jit
def _rotary_cache_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_table,
    NUM_Q: tl.constexpr,
    NUM_K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    allow_next_then_wait(USE_PDL)  # engine.kernels.pdl
    t = tl.program_id(0)
    cos, sin = _cos_sin(pos_ptr, cos_ptr, sin_ptr, t, stride_table, HALF, BLOCK_HALF)
    i = tl.arange(0, BLOCK_HALF)
    imask = i < HALF
    hq = tl.arange(0, BLOCK_Q)
    offs = t * stride_qt + hq[:, None] * stride_qh + i[None, :]
    mask = (hq < NUM_Q)[:, None] & imask[None, :]
    _rotate_heads(q_ptr, q_ptr, offs, offs, mask, cos, sin, HALF)
    # The caches are contiguous: a slot holds NUM_K heads of 2 * HALF values.
    slot = tl.load(slot_ptr + t).to(tl.int64)
    hk = tl.arange(0, BLOCK_K)
    mask = (hk < NUM_K)[:, None] & imask[None, :]
    cache_offs = slot * (NUM_K * 2 * HALF) + hk[:, None] * (2 * HALF) + i[None, :]
    offs = t * stride_kt + hk[:, None] * stride_kh + i[None, :]
    _rotate_heads(k_ptr, k_cache_ptr, offs, cache_offs, mask, cos, sin, HALF)
    offs = t * stride_vt + hk[:, None] * stride_vh + i[None, :]
    for h in tl.static_range(2):  # the two halves of each value head, copied as they are
        v = tl.load(v_ptr + offs + h * HALF, mask=mask, other=0.0)
        tl.store(v_cache_ptr + cache_offs + h * HALF, v, mask=mask)


def rotary_and_cache_(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Rotary embedding (rotate-half form) on q and k, then the cache write of k and v
    (engine.layers.attention.write_kv), in one kernel: q is rotated in place, the rotated k
    and the unchanged v go to the caches at their slots.

    k itself is left unrotated (the attention kernels read keys only from the cache), so pass
    k = v = None to the attention call that follows.

    q: [T, H, D]; k, v: [T, Hkv, D] (views of one projection are fine; the last dim of each
    head contiguous); positions, slot_mapping: [T] long; cos, sin: [max_positions, D] float32
    tables whose two halves are equal; caches: [num_blocks, block_size, Hkv, D] contiguous.
    """
    t, num_q, head_dim = q.shape
    if not t:
        return
    half = head_dim // 2
    num_k = k.shape[1]
    _rotary_cache_kernel[(t,)](
        q, k, v, positions, cos, sin, k_cache, v_cache, slot_mapping, q.stride(0), q.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0), NUM_Q=num_q,
        NUM_K=num_k, BLOCK_Q=triton.next_power_of_2(num_q), BLOCK_K=triton.next_power_of_2(num_k),
        HALF=half, BLOCK_HALF=triton.next_power_of_2(half), **pdl.launch_options(q.device),
    )  # fmt: skip


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, stride_x, n, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n
    g = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(x_ptr + row * stride_x + n + cols, mask=mask, other=0.0).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(out_ptr.dtype.element_ty)  # rounded as F.silu's output
    tl.store(out_ptr + row * n + cols, act.to(tl.float32) * u, mask=mask)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate | up) -> silu(gate) * up: [T, I]."""
    t, two_n = x.shape
    n = two_n // 2
    out = torch.empty((t, n), dtype=x.dtype, device=x.device)
    if t:
        _silu_mul_kernel[(t, triton.cdiv(n, SILU_BLOCK))](x, out, x.stride(0), n, BLOCK=SILU_BLOCK)
    return out
