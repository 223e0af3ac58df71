"""Fused elementwise layers in Triton for the GPU path: residual add + RMSNorm, rotary embedding
applied in place to queries and keys, SiLU(gate) * up. Each replaces several PyTorch kernels
with one; at small batch a decode step is mostly kernel launches and their tails, so the count
matters even inside a CUDA graph. They round where the PyTorch layers round (the sum to the
model dtype, the normalised value before the weight). The model's PyTorch code stays the CPU
path; these also run in Triton's interpreter (TRITON_INTERPRET=1), which is how CI checks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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
):
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
        )  # fmt: skip
    return out, res_out


@triton.jit
def _rotary_kernel(
    q_ptr,
    k_ptr,
    pos_ptr,
    cos_ptr,
    sin_ptr,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_table,
    NUM_Q: tl.constexpr,
    NUM_K: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    t = tl.program_id(0)
    pos = tl.load(pos_ptr + t)
    i = tl.arange(0, BLOCK_HALF)
    imask = i < HALF
    cos = tl.load(cos_ptr + pos * stride_table + i, mask=imask, other=0.0)[None, :]
    sin = tl.load(sin_ptr + pos * stride_table + i, mask=imask, other=0.0)[None, :]
    hq = tl.arange(0, BLOCK_Q)
    offs = t * stride_qt + hq[:, None] * stride_qh + i[None, :]
    mask = (hq < NUM_Q)[:, None] & imask[None, :]
    x1 = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(q_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(q_ptr + offs, (x1 * cos - x2 * sin).to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(q_ptr + offs + HALF, (x2 * cos + x1 * sin).to(q_ptr.dtype.element_ty), mask=mask)
    hk = tl.arange(0, BLOCK_K)
    offs = t * stride_kt + hk[:, None] * stride_kh + i[None, :]
    mask = (hk < NUM_K)[:, None] & imask[None, :]
    x1 = tl.load(k_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(k_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
    tl.store(k_ptr + offs, (x1 * cos - x2 * sin).to(k_ptr.dtype.element_ty), mask=mask)
    tl.store(k_ptr + offs + HALF, (x2 * cos + x1 * sin).to(k_ptr.dtype.element_ty), mask=mask)


def rotary_(
    q: torch.Tensor,
    k: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """Rotate q: [T, H, D] and k: [T, Hkv, D] in place (rotate-half form; the last dim of each
    head contiguous). positions: [T]; cos, sin: [max_positions, D] float32 tables whose two
    halves are equal."""
    t, num_q, head_dim = q.shape
    if not t:
        return
    half = head_dim // 2
    _rotary_kernel[(t,)](
        q, k, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        cos.stride(0), NUM_Q=num_q, NUM_K=k.shape[1], BLOCK_Q=triton.next_power_of_2(num_q),
        BLOCK_K=triton.next_power_of_2(k.shape[1]), HALF=half,
        BLOCK_HALF=triton.next_power_of_2(half),
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
