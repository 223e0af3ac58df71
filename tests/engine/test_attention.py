"""Paged attention against a dense reference on random data (no model)."""

from __future__ import annotations

import random

import pytest
import torch

from engine.layers.attention import ChunkSpec, TorchPagedAttention


def reference(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    start: int,
    scale: float,
    window: int | None,
) -> torch.Tensor:
    """Dense causal attention of q ([n, H, D], positions start..start+n-1) over the sequence's
    keys/values ([start + n, Hkv, D])."""
    n, heads, _ = q.shape
    group = heads // keys.shape[1]
    k = keys.repeat_interleave(group, dim=1)  # [C, H, D]
    v = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("nhd,chd->hnc", q, k) * scale  # [H, n, C]
    q_pos = torch.arange(start, start + n).unsqueeze(1)
    k_pos = torch.arange(keys.shape[0]).unsqueeze(0)
    allowed = k_pos <= q_pos
    if window:
        allowed &= k_pos > q_pos - window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hnc,chd->nhd", scores.softmax(-1), v)


@pytest.mark.parametrize("window", [None, 5])
def test_paged_attention_matches_dense(window: int | None) -> None:
    torch.manual_seed(0)
    rng = random.Random(0)
    heads, kv_heads, dim, block_size, num_blocks = 4, 2, 8, 4, 64
    scale = dim**-0.5
    attention = TorchPagedAttention()
    k_cache = torch.zeros(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.zeros(num_blocks, block_size, kv_heads, dim)
    free = list(range(num_blocks))
    rng.shuffle(free)  # block tables deliberately not contiguous

    # (already cached tokens, new tokens): decodes, a fresh prefill, a later prefill chunk.
    shapes = [(9, 1), (0, 7), (5, 6), (14, 1), (0, 1), (3, 3)]
    chunks, history, new_q, new_k, new_v = [], [], [], [], []
    for cached, new in shapes:
        total = cached + new
        table = [free.pop() for _ in range(-(-total // block_size))]
        keys, values = torch.randn(total, kv_heads, dim), torch.randn(total, kv_heads, dim)
        for p in range(cached):  # what earlier steps would have written
            k_cache[table[p // block_size], p % block_size] = keys[p]
            v_cache[table[p // block_size], p % block_size] = values[p]
        chunks.append(ChunkSpec(cached, new, table))
        history.append((keys, values))
        new_q.append(torch.randn(new, heads, dim))
        new_k.append(keys[cached:])
        new_v.append(values[cached:])

    meta = attention.build_metadata(chunks, block_size, torch.device("cpu"))
    out = attention(
        torch.cat(new_q), torch.cat(new_k), torch.cat(new_v), k_cache, v_cache, meta, scale, window
    )
    row = 0
    for chunk, (keys, values), q in zip(chunks, history, new_q, strict=True):
        want = reference(q, keys, values, chunk.start, scale, window)
        torch.testing.assert_close(out[row : row + chunk.num_tokens], want)
        row += chunk.num_tokens
