"""Matrix products for decode batches of a few dozen rows: y = x W^T on tensor cores, with the
reduction over K split between programs when the weight has too few output tiles to fill the
GPU.

A decode step of 2-128 sequences still reads every weight once and multiplies each weight tile
by few rows, so a linear layer costs its weight bytes at the memory bandwidth, as at batch 1.
cuBLAS picks one tile per 64 or 128 output features and walks the whole of K in it: on the
`1b` model's o (2048 x 2048) and qkv (3072 x 2048) that is 32 and 48 programs on a GPU of 132
SMs, and those layers ran at 27 % and 37 % of the copy bandwidth at 65 rows (H200,
bench/profile_mixed.py decode-65). Here each program owns BLOCK_N output features of every
row and a 1/SPLIT_K share of K, so a small weight is read by enough programs at once.

Split K: each program stores its fp32 partial [M, BLOCK_N] in a workspace and counts itself in
on its output tile's arrival counter (an atomic with acquire-release ordering, after a barrier
so every thread's stores come first); the last of the SPLIT_K to arrive adds the partials in
split order (the same bits whatever order the programs ran in), stores the tile and sets the
counter back to zero, so neither a call nor a CUDA graph replay needs a memset. The counters
are allocated once per device, outside any capture (`counters`).

The x tile is padded to a power of two rows (at least 16, tl.dot's smallest), masked rows read
nothing. Accumulation is fp32 and the output is rounded once, like cuBLAS's. Runs in Triton's
interpreter (TRITON_INTERPRET=1), which is how CI checks it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from engine.kernels import pdl

# Rows this kernel takes: above them a decode batch's tiles are wide enough for cuBLAS (and
# mixed steps of hundreds of tokens are compute-bound). One row is engine.kernels.gemv's.
MIN_ROWS = 2
MAX_ROWS = 128
# Arrival counters per device: one per output tile of a split call (the widest split weight,
# `8b`'s gate_up, has 28672 / 64 = 448 tiles).
NUM_COUNTERS = 4096


@dataclass(frozen=True)
class SkinnyConfig:
    """Output features (block_n) and K columns (block_k) per program step, and the programs
    sharing one output tile's K (split_k)."""

    block_n: int
    block_k: int
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4


def suits(m: int, weight: torch.Tensor) -> bool:
    """Whether an input of m rows against this [N, K] weight takes the kernel: 16-bit weights
    (int8 ones have engine.kernels.gemv and cuBLAS through engine.layers.quant), row-major."""
    return (MIN_ROWS <= m <= MAX_ROWS and weight.dtype in (torch.bfloat16, torch.float16)
            and weight.stride(-1) == 1)  # fmt: skip


# Programs that keep every SM of an H100/H200 (132) streaming: two per SM.
TARGET_PROGRAMS = 264


@functools.cache
def default_config(m: int, n: int, k: int) -> SkinnyConfig:
    """Block sizes for an [m, k] x [n, k]^T product: 64 output features a program (128 rows
    of x against 64 weight rows keep the re-read of x from L2 at half the weight's bytes),
    then K split until the output tiles times the split reach TARGET_PROGRAMS, each split at
    least 256 columns; 128 columns a step with at most 64 rows, 64 above (shared memory per
    stage)."""
    rows = max(16, triton.next_power_of_2(m))
    block_n = 64
    block_k = 128 if rows <= 64 else 64
    tiles = triton.cdiv(n, block_n)
    split = 1
    while tiles * split * 2 <= TARGET_PROGRAMS and k // (split * 2) >= 256:
        split *= 2
    return SkinnyConfig(block_n, block_k, split)


_COUNTERS: dict[torch.device, torch.Tensor] = {}


def counters(device: torch.device) -> torch.Tensor:
    """The device's arrival counters, all zero between calls. Allocated on the first call,
    which must not be inside a CUDA graph capture (the capture's warm-up runs first)."""
    found = _COUNTERS.get(device)
    if found is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("skinny_gemm's counters must be allocated before capture")
        found = _COUNTERS[device] = torch.zeros(NUM_COUNTERS, dtype=torch.int32, device=device)
    return found


@triton.jit
def _skinny_gemm_kernel(
    x_ptr,  # [M, K], unit stride along K
    w_ptr,  # [N, K], unit stride along K
    bias_ptr,  # [N] (read only when HAS_BIAS)
    out_ptr,  # [M, N]
    part_ptr,  # [SPLIT_K, M, N] fp32 partials (SPLIT_K > 1)
    counters_ptr,  # [>= cdiv(N, BLOCK_N)] int32, zero on entry and on exit (SPLIT_K > 1)
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
    SPLIT_K: tl.constexpr,
    EVEN_K: tl.constexpr,  # K is a multiple of SPLIT_K * BLOCK_K: no column masks
    USE_PDL: tl.constexpr,
):
    tile = tl.program_id(0)
    split = tl.program_id(1)
    k_share = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = split * k_share
    k_hi = tl.minimum(k_lo + k_share, K)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + (k_lo + offs_k)[None, :]
    w_ptrs = w_ptr + offs_n[:, None] * stride_wn + (k_lo + offs_k)[None, :]
    if USE_PDL:  # nothing before this reads what an earlier kernel writes (engine.kernels.pdl)
        tl.extra.cuda.gdc_wait()
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            cols = (k0 + offs_k < k_hi)[None, :]
            x = tl.load(x_ptrs, mask=mask_m[:, None] & cols, other=0.0)
            w = tl.load(w_ptrs, mask=mask_n[:, None] & cols, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc)
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if USE_PDL:  # late: the next kernel's programs would only wait for SM slots ours need
        tl.extra.cuda.gdc_launch_dependents()
    out_mask = mask_m[:, None] & mask_n[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tile_offs = offs_m[:, None] * N + offs_n[None, :]
        tl.store(part_ptr + split * M * N + tile_offs, acc, mask=out_mask)
        # Every thread's stores issued before the release; the acquire of the last program to
        # arrive then sees all the others' partials.
        tl.debug_barrier()
        done = tl.atomic_add(counters_ptr + tile, 1, sem="acq_rel")
        if done == SPLIT_K - 1:
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in tl.static_range(SPLIT_K):
                # .cg: from L2, where the other programs' stores are (not a stale L1 line)
                total += tl.load(part_ptr + s * M * N + tile_offs, mask=out_mask, other=0.0,
                                 cache_modifier=".cg")
            if HAS_BIAS:
                total += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
            tl.store(out_ptrs, total.to(out_ptr.dtype.element_ty), mask=out_mask)
            tl.store(counters_ptr + tile, 0)  # zero again for the next call


def skinny_gemm(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    config: SkinnyConfig | None = None,
) -> torch.Tensor:
    """y = x W^T (+ bias) for x [M, K] with MIN_ROWS <= M <= MAX_ROWS, weight [N, K] and bias
    [N] in x's dtype. Returns y [M, N] in x's dtype."""
    m, k = x.shape
    n = weight.shape[0]
    if not MIN_ROWS <= m <= MAX_ROWS:
        raise ValueError(f"skinny_gemm takes {MIN_ROWS}..{MAX_ROWS} rows, got {m}")
    if weight.shape[1] != k:
        raise ValueError(f"skinny_gemm: x {tuple(x.shape)} does not fit weight"
                         f" {tuple(weight.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        raise ValueError("skinny_gemm: the weight must be row-major")
    cfg = config or default_config(m, n, k)
    tiles = triton.cdiv(n, cfg.block_n)
    split = cfg.split_k if tiles <= NUM_COUNTERS else 1
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if split > 1:
        part = torch.empty((split, m, n), dtype=torch.float32, device=x.device)
        arrivals = counters(x.device)
    else:
        part = arrivals = out  # never read
    _skinny_gemm_kernel[(tiles, split)](
        x, weight, bias if bias is not None else out, out, part, arrivals,
        m, n, k, x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=max(16, triton.next_power_of_2(m)),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, SPLIT_K=split,
        EVEN_K=k % (split * cfg.block_k) == 0,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl.launch_options(x.device),
    )  # fmt: skip
    return out
