"""Weight-only int8 matmuls in Triton: y = (x W^T) * scale + b with W held as int8, one scale
per row. The kernels read the int8 weight tiles, convert them in registers and apply the row
scales once at the end, so the weight costs half the bytes of bfloat16 on the way from memory:

- for at most `GEMV_MAX_M` rows, engine.kernels.gemv's matrix-vector kernel (shared with the
  bfloat16 decode path): each program owns a few output rows and walks all of K with plain
  multiply-adds (no tensor cores: at this M they would idle);
- a tiled `tl.dot` kernel for larger M.

Which inputs take them is the layer's choice (engine.layers.quant.int8_linear). Neither kernel
syncs with the host, so both can be captured in a CUDA graph; each kernel variant (one per
block configuration) is compiled at its first call, so run every batch size once before
capturing.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels.gemv import MAX_ROWS, GemvConfig, gemv

# Rows of x up to which the GEMV kernel beats the tl.dot kernel: its multiply-adds run on the
# CUDA cores, M of them per weight byte, which stays below the memory time only for tiny M.
GEMV_MAX_M = MAX_ROWS
# Triton's CPU interpreter (TRITON_INTERPRET=1, read when triton is imported) multiplies bfloat16
# tl.dot operands wrongly (Triton 3.9): there the tiled kernel upcasts them to float32 first.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on")


@dataclass(frozen=True)
class KernelConfig:
    """One block configuration: rows of W (block_n) and columns of K (block_k) per step of one
    program; block_m is the rows of x one program covers."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@functools.cache
def default_config(m: int) -> KernelConfig:
    """The tl.dot kernel's block configuration for an input of m > GEMV_MAX_M rows (chosen for
    H100/H200; the micro-benchmark `bench/bench_gemv.py --sweep` times the alternatives)."""
    if m <= 16:
        # Few output tiles at this M: narrow ones, so that every SM gets some.
        return KernelConfig(16, block_n=32, block_k=256, num_warps=4, num_stages=4)
    if m <= 32:
        return KernelConfig(32, block_n=64, block_k=128, num_warps=4, num_stages=4)
    return KernelConfig(64, block_n=64, block_k=128, num_warps=4, num_stages=4)


def int8_linear_triton(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: KernelConfig | GemvConfig | None = None,
) -> torch.Tensor:
    """The Triton kernels on any input size (tests run them in Triton's interpreter on CPU
    tensors, TRITON_INTERPRET=1 set before triton is imported).

    x: [..., K]; qweight: [N, K] int8; scale: [N]; bias: [N] or None -> [..., N] in x.dtype.
    config: block sizes, a GemvConfig for at most GEMV_MAX_M rows (engine.kernels.gemv), else a
    KernelConfig; the defaults for M when None.
    """
    n, k = qweight.shape
    if x.shape[-1] != k or scale.shape != (n,) or (bias is not None and bias.shape != (n,)):
        raise ValueError(
            f"int8_linear: x {tuple(x.shape)}, weight {tuple(qweight.shape)}, "
            f"scale {tuple(scale.shape)}, bias {None if bias is None else tuple(bias.shape)}"
        )
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)  # [M, K]
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = qweight if qweight.stride(-1) == 1 else qweight.contiguous()
    s = scale.contiguous()
    m = x2.shape[0]
    if 0 < m <= GEMV_MAX_M and n:
        assert config is None or isinstance(config, GemvConfig)
        return gemv(x2, w, bias, s, config=config)[0].reshape(*lead, n)
    b = s if bias is None else bias.contiguous()  # an unused pointer when there is no bias
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)  # [M, N]
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    cfg = config or default_config(m)
    assert isinstance(cfg, KernelConfig)
    _int8_mm_kernel[(triton.cdiv(n, cfg.block_n), triton.cdiv(m, cfg.block_m))](
        x2, w, s, b, out, m, n, k, x2.stride(0), w.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, EVEN_K=k % cfg.block_k == 0,
        DOT_FP32=INTERPRETED and x.dtype == torch.bfloat16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out.reshape(*lead, n)


@triton.jit
def _int8_mm_kernel(
    x_ptr,  # [M, K], unit stride along K
    w_ptr,  # [N, K] int8, unit stride along K
    scale_ptr,  # [N]
    bias_ptr,  # [N] (read only when HAS_BIAS)
    out_ptr,  # [M, N]
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    EVEN_K: tl.constexpr,
    DOT_FP32: tl.constexpr,  # tl.dot on float32 operands (see INTERPRETED)
):
    # One program: a [BLOCK_M, BLOCK_N] tile of the output. The int8 W tile is converted
    # to x's dtype in registers and fed to tl.dot (fp32 accumulator).
    pid_n = tl.program_id(0)  # fastest: neighbouring programs share the rows of x
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]  # [BM, BK]
    w_ptrs = w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None]  # [BK, BN] (W^T)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            x_mask = mask_m[:, None]
            w_mask = mask_n[None, :]
        else:
            in_k = k0 + offs_k
            x_mask = mask_m[:, None] & (in_k[None, :] < K)
            w_mask = mask_n[None, :] & (in_k[:, None] < K)
        x = tl.load(x_ptrs, mask=x_mask, other=0.0)
        w = tl.load(w_ptrs, mask=w_mask, other=0)
        if DOT_FP32:
            acc = tl.dot(x.to(tl.float32), w.to(tl.float32), acc)
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)  # exact: |w| <= 127
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y = acc * tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
