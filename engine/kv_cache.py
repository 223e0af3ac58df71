"""The paged KV cache's bookkeeping: which fixed-size blocks each sequence holds.

Pure Python so that the scheduler (and its tests) need no torch; the cache tensors themselves
are allocated by the runner from the block count decided here.
"""

from __future__ import annotations

from collections import deque

from engine.sequence import Sequence


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class BlockManager:
    """Hands out KV-cache blocks of `block_size` tokens from a pool of `num_blocks`.

    A sequence's block table maps its token positions to blocks: position p lives in block
    `block_table[p // block_size]` at offset `p % block_size`.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Further blocks `seq` needs for its cache to hold `num_tokens` tokens."""
        return max(0, cdiv(num_tokens, self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= len(self._free)

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` blocks enough for `num_tokens` tokens; the caller checked can_grow."""
        needed = self.blocks_needed(seq, num_tokens)
        if needed > len(self._free):
            raise RuntimeError(
                f"{seq.seq_id}: needs {needed} KV blocks, only {len(self._free)} free"
            )
        seq.block_table.extend(self._free.popleft() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        """Return all of `seq`'s blocks to the pool."""
        self._free.extend(seq.block_table)
        seq.block_table = []


def blocks_for_sequences(num_seqs: int, max_model_len: int, block_size: int) -> int:
    """Blocks for `num_seqs` sequences of `max_model_len` tokens each (the CPU default)."""
    return num_seqs * cdiv(max_model_len, block_size)


def block_bytes(
    num_layers: int, block_size: int, num_kv_heads: int, head_dim: int, dtype_bytes: int
) -> int:
    """Bytes one block takes across all layers, keys and values."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype_bytes
