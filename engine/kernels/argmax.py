"""Greedy decoding's argmax over the vocabulary, in two short launches.

torch.argmax reduces a row in one thread block: over a 128k vocabulary at batch 1 that is one
SM working for tens of microseconds while the rest idle. Here the row is split into blocks of
`BLOCK` logits, one program each (first stage), and a single program picks the best of their
maxima (second stage). Ties go to the lowest index, as torch.argmax breaks them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels import pdl
from engine.kernels.pdl import allow_next_then_wait

# Logits per first-stage program: ~60-130 programs for the 32k-256k vocabularies of the
# Llama family, about one per SM.
BLOCK = 2048


@triton.jit
def _block_max_kernel(
    logits_ptr, val_ptr, idx_ptr, V, stride, NUM_BLOCKS, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):
    allow_next_then_wait(USE_PDL)  # engine.kernels.pdl
    row = tl.program_id(0)
    blk = tl.program_id(1)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(logits_ptr + row * stride + offs, mask=offs < V, other=float("-inf"))
    x = x.to(tl.float32)
    best = tl.argmax(x, axis=0, tie_break_left=True)
    tl.store(val_ptr + row * NUM_BLOCKS + blk, tl.max(x, axis=0))
    tl.store(idx_ptr + row * NUM_BLOCKS + blk, blk * BLOCK + best)


@triton.jit
def _pick_kernel(
    val_ptr, idx_ptr, out_ptr, NUM_BLOCKS, BLOCK_P: tl.constexpr, USE_PDL: tl.constexpr
):
    allow_next_then_wait(USE_PDL)
    row = tl.program_id(0)
    p = tl.arange(0, BLOCK_P)
    vals = tl.load(val_ptr + row * NUM_BLOCKS + p, mask=p < NUM_BLOCKS, other=float("-inf"))
    best = tl.argmax(vals, axis=0, tie_break_left=True)
    tl.store(out_ptr + row, tl.load(idx_ptr + row * NUM_BLOCKS + best))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """logits: [B, V] (last dim contiguous) -> [B] long, the index of each row's maximum."""
    rows, vocab = logits.shape
    out = torch.empty(rows, dtype=torch.long, device=logits.device)
    if not rows:
        return out
    num_blocks = triton.cdiv(vocab, BLOCK)
    vals = torch.empty((rows, num_blocks), dtype=torch.float32, device=logits.device)
    idx = torch.empty((rows, num_blocks), dtype=torch.long, device=logits.device)
    options = pdl.launch_options(logits.device)
    _block_max_kernel[(rows, num_blocks)](
        logits, vals, idx, vocab, logits.stride(0), num_blocks, BLOCK=BLOCK, **options
    )
    _pick_kernel[(rows,)](
        vals, idx, out, num_blocks, BLOCK_P=triton.next_power_of_2(num_blocks), **options
    )
    return out
