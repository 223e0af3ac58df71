"""Matrix-vector products for decode-sized batches, with the layer before them fused in.

At batch 1 a decode step reads every weight once and does almost no arithmetic, so a linear
layer costs its weight's bytes at the memory bandwidth, and what separates a step from that
floor is launches, tails and the small kernels between the matmuls. This kernel serves a
linear layer of at most `MAX_ROWS` input rows (cuBLAS serves larger ones) and can compute its
own input on the way in, replacing the kernel that would have produced it:

- `RMS_NORM`: the input is RMSNorm(x + residual) * norm weight. Every program recomputes the
  row's norm over all of K (a few KiB, from L2); the first program also stores x + residual,
  the residual stream the next layer reads.
- `SILU_MUL`: the input is SiLU(gate) * up, gate and up being the two halves of x's row.

Each rounds where the unfused layers round (engine.layers, engine.kernels.elementwise), so the
fused and unfused paths agree up to the order of the fp32 accumulation.

The weight may be int8 with one scale per output row (weight-only quantisation, see
engine.layers.quant): the tile is converted in registers and the scale applied once at the end.

Each program owns BLOCK_N output features for all M rows and walks the whole of K, multiplying
elementwise into an fp32 [M, BLOCK_N, BLOCK_K] accumulator that is summed over K only at the
end. No tensor cores: at M <= 4 they would idle while the weight streams in. Nothing here syncs
with the host, so calls can be captured in CUDA graphs; they also run in Triton's interpreter
(TRITON_INTERPRET=1), which is how CI checks them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels import pdl

# Input rows this kernel takes. Measured on an H200 (bench/bench_gemv.py): with an int8 weight
# it is the decode path up to 4 rows; on a bfloat16 weight it beats cuBLAS at one row, on
# matrices of at most MAX_ELEMENTS (the 1b model's qkv, o and down; cuBLAS's own GEMV kernels
# reach 85-98 % of the copy bandwidth on larger ones), and loses from two rows on.
MAX_ROWS = 4
MAX_ROWS_16BIT = 1
MAX_ELEMENTS = 1 << 24
# With SiLU(gate) * up computed on the way in (down), the kernel also saves the activation's
# own kernel, and wins on larger matrices: `8b`'s down split over two GPUs (29M elements) takes
# 19.3 us against 21.7 for the activation then cuBLAS; `8b`'s whole down (59M) loses, 34.8
# against 33.4 (H200, bench/bench_gemv.py --sweep).
MAX_ELEMENTS_SILU_MUL = 1 << 25
# The input transforms (values of the kernel's PROLOGUE; constexpr so kernels can read them).
NONE = tl.constexpr(0)
RMS_NORM = tl.constexpr(1)
SILU_MUL = tl.constexpr(2)


@dataclass(frozen=True)
class GemvConfig:
    """Output features (block_n) and K columns (block_k) one program handles per step."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 1


def suits(m: int, weight: torch.Tensor, silu_mul: bool = False) -> bool:
    """Whether an input of m rows against this [N, K] weight should take the kernel (with
    SiLU(gate) * up computed on the way in when silu_mul)."""
    if weight.dtype == torch.int8:
        return 0 < m <= MAX_ROWS
    limit = MAX_ELEMENTS_SILU_MUL if silu_mul else MAX_ELEMENTS
    return 0 < m <= MAX_ROWS_16BIT and weight.numel() <= limit


def fuses_input(weight: torch.Tensor) -> bool:
    """Whether the model fuses the layer before into this weight's GEMV. Not for int8
    weights: every program re-reads the whole input row, and at half the weight bytes per
    program that costs more than the kernel it saves (8b W-latency on an H200: 183 tokens/s
    fused, at commit d1c9c0a, against 230 unfused before the fusion, at 6c1b40b)."""
    return weight.dtype != torch.int8


@functools.cache
def default_config(m: int, n: int, k: int, int8: bool, prologue: int = 0) -> GemvConfig:
    """Block sizes for an [m, k] x [n, k]^T product, chosen on an H200 with
    `bench/bench_gemv.py --sweep` on the 1b layer shapes as the model calls them:

    - plain (o) and SiLU in front (down), on 2048 output features (1b): four rows per
      program, 1024 columns a step, four warps;
    - the same on 4096 or more (8b, whole or split over two GPUs): with twice the programs,
      smaller ones fill the GPU better: plain, four rows a step of 512, two warps (8b o
      10.9 us against 11.9 for the 1b choice; split over two GPUs 6.7 against 7.4, while 1b's
      o takes 5.0 against 4.3); SiLU in front, eight rows a step of 512, four warps (8b down
      split over two GPUs 19.3 against 20.1);
    - with the norm in front (qkv), eight rows a step of 512, eight warps: every program
      reads the whole input row, so more rows per program halve that traffic;
    - int8 weights: four rows, 1024 columns, four warps (the earlier int8-only kernel's
      block sizes, with which int8 decoding was measured).

    The accumulator holds m * block_n * block_k / threads fp32 values per thread, so block_k
    shrinks as the rows grow."""
    rows = triton.next_power_of_2(m)
    if int8:
        block_n, block_k, warps = 4, 1024, 4
    elif prologue == RMS_NORM.value:
        block_n, block_k, warps = 8, 512, 8
    elif n < 4096:
        block_n, block_k, warps = 4, 1024, 4
    elif prologue == SILU_MUL.value:
        block_n, block_k, warps = 8, 512, 4
    else:
        block_n, block_k, warps = 4, 512, 2
    return GemvConfig(block_n, min(block_k // rows, triton.next_power_of_2(k)), num_warps=warps)


@triton.jit
def _input_tile(
    x_ptr,
    res_ptr,
    norm_w_ptr,
    rstd,
    offs_m,
    offs_k,
    mask,
    stride_xm,
    stride_rm,
    K,
    PROLOGUE: tl.constexpr,
    HAS_RES: tl.constexpr,
):
    """[BLOCK_M, BLOCK_K] of the layer's input at columns offs_k, in fp32, rounded as the
    unfused layers round."""
    dtype = x_ptr.dtype.element_ty
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    if PROLOGUE == SILU_MUL:
        gate = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptrs + K, mask=mask, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
        return (act * up).to(dtype).to(tl.float32)
    x = tl.load(x_ptrs, mask=mask, other=0.0)
    if PROLOGUE == RMS_NORM:
        if HAS_RES:
            r = tl.load(
                res_ptr + offs_m[:, None] * stride_rm + offs_k[None, :], mask=mask, other=0.0
            )
            x = (x.to(tl.float32) + r.to(tl.float32)).to(dtype)
        y = (x.to(tl.float32) * rstd[:, None]).to(dtype)
        w = tl.load(norm_w_ptr + offs_k, mask=offs_k < K, other=0.0)
        x = (y.to(tl.float32) * w.to(tl.float32)[None, :]).to(dtype)
    return x.to(tl.float32)


@triton.jit
def _gemv_kernel(
    x_ptr,  # [M, K] ([M, 2K] for SILU_MUL), unit stride along K
    w_ptr,  # [N, K], unit stride along K
    scale_ptr,  # [N] (read only when HAS_SCALE)
    bias_ptr,  # [N] (read only when HAS_BIAS)
    out_ptr,  # [M, N]
    res_ptr,  # [M, K] residual (RMS_NORM with HAS_RES)
    norm_w_ptr,  # [K] norm weight (RMS_NORM)
    res_out_ptr,  # [M, K] x + residual, written by program 0 (RMS_NORM with HAS_RES)
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    stride_rm,
    eps,
    PROLOGUE: tl.constexpr,
    HAS_RES: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    # The first weight tile is read before waiting on the previous kernel (engine.kernels.pdl): no
    # kernel writes weights, and this is the latency a chain of short matmuls pays each time.
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :]  # [BN, BK]
    w_first = tl.load(w_ptrs, mask=mask_n[:, None] & (offs_k < K)[None, :], other=0)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
    rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
    if PROLOGUE == RMS_NORM:
        # The row's norm over all of K before any product can use it.
        squares = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            mask = mask_m[:, None] & (kk < K)[None, :]
            x_ptrs = x_ptr + offs_m[:, None] * stride_xm + kk[None, :]
            x = tl.load(x_ptrs, mask=mask, other=0.0)
            if HAS_RES:
                r = tl.load(
                    res_ptr + offs_m[:, None] * stride_rm + kk[None, :], mask=mask, other=0.0
                )
                x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
                if pid == 0:
                    tl.store(res_out_ptr + offs_m[:, None] * K + kk[None, :], x, mask=mask)
            xf = x.to(tl.float32)
            squares += xf * xf
        rstd = tl.rsqrt(tl.sum(squares, axis=1) / K + eps)
    # Each step requests the next weight tile before multiplying the current one, so two
    # tiles per program are in flight while the products run.
    acc = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_K), dtype=tl.float32)
    w_cur = w_first
    k_cur = 0
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w_next = tl.load(w_ptrs + k0, mask=mask_n[:, None] & (k0 + offs_k < K)[None, :], other=0)
        x = _input_tile(
            x_ptr, res_ptr, norm_w_ptr, rstd, offs_m, k_cur + offs_k,
            mask_m[:, None] & (k_cur + offs_k < K)[None, :], stride_xm, stride_rm, K, PROLOGUE,
            HAS_RES,
        )  # fmt: skip
        acc += x[:, None, :] * w_cur.to(tl.float32)[None, :, :]
        w_cur = w_next
        k_cur = k0
    x = _input_tile(
        x_ptr, res_ptr, norm_w_ptr, rstd, offs_m, k_cur + offs_k,
        mask_m[:, None] & (k_cur + offs_k < K)[None, :], stride_xm, stride_rm, K, PROLOGUE, HAS_RES,
    )  # fmt: skip
    acc += x[:, None, :] * w_cur.to(tl.float32)[None, :, :]
    if USE_PDL:  # late: the next kernel's programs would only wait for SM slots ours need
        tl.extra.cuda.gdc_launch_dependents()
    y = tl.sum(acc, axis=2)  # [BM, BN]
    if HAS_SCALE:
        y = y * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
    *,
    norm_weight: torch.Tensor | None = None,
    eps: float = 0.0,
    residual: torch.Tensor | None = None,
    silu_mul: bool = False,
    config: GemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y = input W^T (* scale) (+ bias) for an input of at most MAX_ROWS rows.

    x: [M, K] ([M, 2K], gate | up, with silu_mul); weight: [N, K] in x.dtype, or int8 with
    scale [N]; bias: [N] or None. With norm_weight ([K]) the input is
    RMSNorm(x + residual) * norm_weight (residual [M, K] or None); with silu_mul it is
    SiLU(gate) * up.

    Returns (y [M, N] in x.dtype, x + residual [M, K] when a residual was given, else None).
    """
    m = x.shape[0]
    n, k = weight.shape
    if not 0 < m <= MAX_ROWS:
        raise ValueError(f"gemv takes 1..{MAX_ROWS} rows, got {m}")
    if x.shape[1] != (2 * k if silu_mul else k):
        raise ValueError(f"gemv: x {tuple(x.shape)} does not fit weight {tuple(weight.shape)}")
    if silu_mul and norm_weight is not None:
        raise ValueError("gemv: one input transform at a time")
    prologue = SILU_MUL if silu_mul else RMS_NORM if norm_weight is not None else NONE
    x = _row_major(x)
    weight = _row_major(weight)
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    res_out = None
    if residual is not None:
        if norm_weight is None:
            raise ValueError("gemv: a residual is added only before the norm")
        residual = _row_major(residual)
        res_out = torch.empty((m, k), dtype=x.dtype, device=x.device)
    cfg = config or default_config(m, n, k, scale is not None, prologue.value)
    _gemv_kernel[(triton.cdiv(n, cfg.block_n),)](
        x, weight, scale if scale is not None else out, bias if bias is not None else out, out,
        residual if residual is not None else x,
        norm_weight if norm_weight is not None else out,
        res_out if res_out is not None else out,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        residual.stride(0) if residual is not None else 0, eps,
        PROLOGUE=prologue.value, HAS_RES=residual is not None, HAS_SCALE=scale is not None,
        HAS_BIAS=bias is not None, BLOCK_M=triton.next_power_of_2(m),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl.launch_options(x.device),
    )  # fmt: skip
    return out, res_out
