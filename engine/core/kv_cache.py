"""The paged KV cache's bookkeeping: which fixed-size blocks each sequence holds, and which
full blocks are kept for reuse by later sequences with the same prefix (prefix caching).

Pure Python so that the scheduler (and its tests) need no torch; the cache tensors themselves
are allocated by the runner (engine.executor.runner), which decides how many blocks fit.

Prefix caching. A full block whose tokens are all computed is registered under its hash,
chained over (the parent block's hash, its token ids), and given a content id that names its
contents in context: two blocks share one only if their token ids and their parents' content
ids are equal, so a content id stands for the whole token prefix up to the block's end. Ids are
never reused, which makes a match exact whatever the hash: a hit is checked against the stored
parent content id and token ids, and a colliding hash only costs a miss. Blocks are
reference-counted; a registered block whose last holder lets go stays cached (evictable, least
recently freed first) until its memory is needed. Only full blocks with every token computed
are registered, so no block is shared while it is being written.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from typing import Final

from engine.core.sequence import Sequence

# The content id and hash standing for "no parent" (a sequence's first block).
ROOT_CONTENT_ID = 0
ROOT_HASH = 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def block_hash(parent_hash: int, tokens: tuple[int, ...]) -> int:
    """A full block's cache index, chained over its parent's. Python's hash of a tuple of ints
    is the same in every process, so the ranks of a sharded group index alike; collisions are
    checked on lookup."""
    return hash((parent_hash, tokens))


def block_hashes(seq: Sequence, block_size: int, num_blocks: int) -> list[int]:
    """The chained hashes of `seq`'s first `num_blocks` full blocks (which it must hold in
    tokens), kept on the sequence: its tokens are only ever appended to."""
    hashes = seq.block_hashes
    while len(hashes) < num_blocks:
        i = len(hashes)
        tokens = tuple(seq.token_ids[i * block_size : (i + 1) * block_size])
        hashes.append(block_hash(hashes[-1] if hashes else ROOT_HASH, tokens))
    return hashes[:num_blocks]


# What a registered block holds, enough to check a hash hit exactly: (hash, parent content id,
# token ids, content id), the parent ROOT_CONTENT_ID for a first block. A plain tuple of ints
# rather than a class: the garbage collector stops tracking such tuples, and a full cache holds
# hundreds of thousands of entries that every full collection would otherwise walk (pauses of
# over 100 ms in the step loop).
_Cached = tuple[int, int, tuple[int, ...], int]
# The fields' indices, literal so that a type checker knows each field's type.
_HASH: Final = 0
_PARENT: Final = 1
_TOKENS: Final = 2
_CONTENT_ID: Final = 3


class BlockManager:
    """Hands out KV-cache blocks of `block_size` tokens from a pool of `num_blocks`.

    A sequence's block table maps its token positions to blocks: position p lives in block
    `block_table[p // block_size]` at offset `p % block_size`.

    Every block is in exactly one state: free (no holder, nothing cached), evictable (no
    holder, contents cached for reuse) or used (held by `ref > 0` sequences). Free and
    evictable blocks together are what `num_free_blocks` counts: an evictable block is handed
    out (and forgotten by the cache) only when no free one is left.

    Args:
        num_blocks: blocks in the pool.
        block_size: tokens per block.
        enable_caching: keep full computed blocks for sequences with the same prefix (the
            engine sets it from EngineConfig.enable_prefix_caching).
    """

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = False) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self._free: deque[int] = deque(range(num_blocks))
        # Cached blocks no sequence holds, least recently freed first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._ref = [0] * num_blocks
        self._cached: dict[int, _Cached] = {}  # block -> what it holds
        self._index: dict[int, int] = {}  # block_hash -> block
        self._next_content_id = ROOT_CONTENT_ID + 1
        self.num_evictions = 0

    # ---- counts --------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out: free ones and evictable cached ones."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered in the prefix cache, held or evictable."""
        return len(self._cached)

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def is_cached(self, block: int) -> bool:
        return block in self._cached

    # ---- growing and freeing -------------------------------------------------------------

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Further blocks `seq` needs for its cache to hold `num_tokens` tokens."""
        return max(0, cdiv(num_tokens, self.block_size) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        # Called for every sequence of a batch every step, and most decode steps fit the
        # blocks a sequence holds (a new one every block_size tokens): answered first.
        if num_tokens <= len(seq.block_table) * self.block_size:
            return True
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Give `seq` blocks enough for `num_tokens` tokens; the caller checked can_grow."""
        if num_tokens <= len(seq.block_table) * self.block_size:
            return  # the usual decode step (see can_grow)
        needed = self.blocks_needed(seq, num_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(
                f"{seq.seq_id}: needs {needed} KV blocks, only {self.num_free_blocks} free"
            )
        seq.block_table.extend(self._allocate() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        """Let go of all of `seq`'s blocks. Cached ones no one else holds become evictable,
        the sequence's last block first, so that a prefix outlives its tails."""
        for block in reversed(seq.block_table):
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._cached:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        seq.block_table = []
        seq.block_content_ids = []

    def _allocate(self) -> int:
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._forget(block)
            self.num_evictions += 1
        self._ref[block] = 1
        return block

    def _forget(self, block: int) -> None:
        entry = self._cached.pop(block)
        if self._index.get(entry[_HASH]) == block:
            del self._index[entry[_HASH]]

    # ---- prefix caching ------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """The cached blocks holding the longest run of `seq`'s leading full blocks, leaving
        at least its last token to compute (so that the step computing it yields logits).
        Nothing is taken yet: `share` does that."""
        if not self.enable_caching:
            return []
        blocks: list[int] = []
        parent = ROOT_CONTENT_ID
        size = self.block_size
        for i, key in enumerate(block_hashes(seq, size, (seq.num_tokens - 1) // size)):
            block = self._index.get(key)
            if block is None:
                break
            entry = self._cached[block]
            if entry[_PARENT] != parent or entry[_TOKENS] != tuple(
                seq.token_ids[i * size : (i + 1) * size]
            ):
                break  # a hash collision: different contents
            blocks.append(block)
            parent = entry[_CONTENT_ID]
        return blocks

    def share_cost(self, blocks: list[int]) -> int:
        """Free blocks that taking `blocks` uses up: the evictable ones among them."""
        return sum(self._ref[b] == 0 for b in blocks)

    def share(self, seq: Sequence, blocks: list[int]) -> None:
        """Make `blocks` (from match_prefix) the start of `seq`'s empty block table."""
        if seq.block_table:
            raise RuntimeError(f"{seq.seq_id}: shares cached blocks but already holds blocks")
        for block in blocks:
            if self._ref[block] == 0:
                del self._evictable[block]
            self._ref[block] += 1
        seq.block_table = list(blocks)
        seq.block_content_ids = [self._cached[b][_CONTENT_ID] for b in blocks]

    def uncomputed_block_hashes(self, seq: Sequence) -> list[int]:
        """The hashes of `seq`'s full blocks of tokens not computed yet: what registering it
        will add to the cache as it goes on."""
        size = self.block_size
        # Placeholders of tokens still on the device are no part of a block's contents yet.
        full = (seq.num_tokens - seq.num_pending) // size
        computed = seq.num_computed_tokens // size
        if full <= computed:
            return []  # most of a batch: decoding inside a block
        return block_hashes(seq, size, full)[computed:]

    def register_computed(self, seq: Sequence) -> None:
        """Register `seq`'s full blocks whose tokens are all computed now (call once its
        num_computed_tokens has moved on). A block whose contents are already cached in
        another block stays private to `seq`; its content id is the cached one's."""
        if not self.enable_caching:
            return
        size = self.block_size
        full = seq.num_computed_tokens // size
        if full <= len(seq.block_content_ids):
            return  # the usual decode step: no block completed
        keys = block_hashes(seq, size, full)
        for i in range(len(seq.block_content_ids), full):
            parent = seq.block_content_ids[-1] if seq.block_content_ids else ROOT_CONTENT_ID
            tokens = tuple(seq.token_ids[i * size : (i + 1) * size])
            seq.block_content_ids.append(
                self._register(seq.block_table[i], keys[i], parent, tokens)
            )

    def _register(self, block: int, key: int, parent: int, tokens: tuple[int, ...]) -> int:
        """Cache `block` (hash `key`) as holding `tokens` after the contents `parent`; return
        its content id."""
        other = self._index.get(key)
        if other is not None:
            entry = self._cached[other]
            if entry[_PARENT] == parent and entry[_TOKENS] == tokens:
                return entry[_CONTENT_ID]  # computed twice (admitted in the same step)
            return self._new_content_id()  # a collision: first come keeps the slot
        if block in self._cached:
            raise RuntimeError(f"KV block {block} is registered twice")
        content_id = self._new_content_id()
        self._cached[block] = (key, parent, tokens, content_id)
        self._index[key] = block
        return content_id

    def _new_content_id(self) -> int:
        content_id = self._next_content_id
        self._next_content_id += 1
        return content_id
