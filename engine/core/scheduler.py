"""Continuous batching with priorities over a paged KV cache. Pure Python: imports no torch.

Every step the scheduler builds one flat batch of token chunks:

1. Running sequences, highest priority and oldest first, each get their next chunk (one token
   in decode, up to the rest of the prompt in a chunked prefill) while the token budget lasts.
   When the cache has no block for one, the newest lowest-priority running sequence is
   preempted: its blocks are freed and it waits to be re-prefilled from its prompt and output.
2. Waiting sequences are admitted, high before low and FIFO within a priority, while the token
   budget, the running slots (low work may not take the `reserved_high_slots`) and the cache
   allow, leaving the running sequences the blocks of their next decode step. A waiting
   sequence may preempt running ones of strictly lower priority for blocks. With prefix
   caching, an admitted sequence first shares the cached blocks of its longest cached prefix
   and computes only the rest: the token budget counts only the tokens computed. A sequence
   whose next blocks (most of its prompt) a running sequence is about to compute waits for
   them (a step or so) rather than compute them again, so a batch sharing a prefix that
   arrives at once computes it once.

While a high sequence runs or waits, low work may be held to a fast lane's limits
(`low_seqs_while_high` sequences and `low_tokens_while_high` tokens a step): the other low
sequences keep their cache blocks and slots but sit the step out, so the step stays short and
a high job's tokens come at close to an idle engine's pace. A high sequence that finds every
running slot taken then preempts the newest low sequence sitting the step out (the lane's few
would free a slot only at the end of a low job). Once high work is gone, the lane holds for
`lane_linger_steps` more steps, then low runs at full width again: high jobs come in streams,
and a full-width step right after one leaves (a whole step's budget of low prompts, ~28 ms on
an H200 at 8192 tokens) is one the next high job, arriving moments later, would wait behind.

On a GPU a step with prefill chunks replays a graph captured at a fixed token count
(engine.executor.mixed_graphs) and is padded up to it, padding that costs as much as real
tokens. When a step lands just above a captured count (the fast lane's 64 sequences and 512
tokens, 63 decode rows and a 449-token prompt piece, and one high row: 513 tokens, padded to
768), its last low prefill chunk gives back the few tokens over the count below (512) to the
next step, where that is fewer than the padding would be (`step_token_sizes`).

A chunk that reaches the end of its sequence's tokens samples the next token; `postprocess`
appends it, registers the blocks it completed in the prefix cache and retires finished
sequences at once.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterable
from dataclasses import dataclass, field

from engine.core.backend import StepOutput
from engine.core.kv_cache import BlockManager, block_hashes, cdiv
from engine.core.sequence import PLACEHOLDER, Sequence, SequenceStatus
from engine.request import FinishReason, KVCacheTooSmallError


@dataclass(slots=True)
class ScheduledChunk:
    """Tokens [start, start + num_tokens) of `seq` are computed this step."""

    seq: Sequence
    start: int
    num_tokens: int
    # Whether the chunk reaches the sequence's last token, so a new token is sampled after it.
    samples: bool
    first_time: bool
    # The chunk's first token is one the step before sampled and the host does not have yet
    # (a PLACEHOLDER): its index among that step's sampled tokens, which the runner reads on
    # the device. None: every token is known.
    input_from: int | None = None


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Whether a waiting sequence may be admitted next step (one is waiting and a running
    # slot is free): the next step's batch may then differ from this one's.
    admission_possible: bool = False

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def sampling_chunks(self) -> list[ScheduledChunk]:
        return [c for c in self.chunks if c.samples]

    @property
    def is_empty(self) -> bool:
        return not self.chunks


SORT_KEY = operator.attrgetter("sort_key")


class _LowLane:
    """What low-priority work may still compute in the step being built (None: no limit)."""

    def __init__(self, seqs: int | None, tokens: int | None) -> None:
        self._seqs = seqs
        self._tokens = tokens
        # Whether there is any limit (else low work is scheduled as high work is).
        self.limited = seqs is not None or tokens is not None

    @property
    def open(self) -> bool:
        return self._seqs != 0 and self._tokens != 0

    @property
    def tokens(self) -> int:
        return self._tokens if self._tokens is not None else 1 << 62

    def take(self, tokens: int) -> None:
        if self._seqs is not None:
            self._seqs -= 1
        if self._tokens is not None:
            self._tokens -= tokens


class Scheduler:
    """Decides, each step, which sequences compute which tokens.

    Args:
        block_manager: the KV-cache block pool.
        max_num_seqs: sequences running at once.
        max_num_batched_tokens: tokens one step may compute.
        reserved_high_slots: running slots that only priority-0 sequences may take.
        max_model_len: a sequence finishes ("length") once it holds this many tokens.
        eos_token_ids: tokens that finish a sequence ("stop") unless it ignores EOS.
        low_seqs_while_high: while a priority-0 sequence runs or waits, at most this many
            lower-priority sequences compute in a step (None: no limit).
        low_tokens_while_high: the same for the tokens lower-priority chunks compute.
        step_token_sizes: the token counts a step with prefill chunks is padded to (ascending;
            the runner's captured mixed steps), or None: no padding to fit.
        lane_linger_steps: steps the fast lane's limits still hold after the last high
            sequence has left. Counted in steps, not seconds, so that every rank of a sharded
            group, each with its own scheduler, takes the same decisions.
    """

    def __init__(
        self,
        block_manager: BlockManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        reserved_high_slots: int,
        max_model_len: int,
        eos_token_ids: Iterable[int],
        low_seqs_while_high: int | None = None,
        low_tokens_while_high: int | None = None,
        step_token_sizes: Iterable[int] | None = None,
        lane_linger_steps: int = 0,
    ) -> None:
        if max_num_batched_tokens < 1:
            raise ValueError("max_num_batched_tokens must be >= 1")
        if low_seqs_while_high is not None and low_seqs_while_high < 1:
            raise ValueError("low_seqs_while_high must be >= 1 (or None)")
        if low_tokens_while_high is not None and low_tokens_while_high < 1:
            raise ValueError("low_tokens_while_high must be >= 1 (or None)")
        if reserved_high_slots >= max_num_seqs:
            raise ValueError("reserved_high_slots must leave at least one slot for low work")
        if lane_linger_steps < 0:
            raise ValueError("lane_linger_steps must be >= 0")
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.reserved_high_slots = reserved_high_slots
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.low_seqs_while_high = low_seqs_while_high
        self.low_tokens_while_high = low_tokens_while_high
        self.step_token_sizes = sorted(step_token_sizes) if step_token_sizes else []
        self.lane_linger_steps = lane_linger_steps
        # Steps the lane still holds for without high work (counted down by _low_lane).
        self._lane_lingers = 0
        # Whether the last schedule() had high work in it, waiting, or left only lane_linger_steps
        # steps ago (the fast lane's limits applied, when set): what a full garbage collection
        # (engine/core/collector.py) waits out.
        self.high_work = False
        self.waiting: list[Sequence] = []  # kept sorted by Sequence.sort_key
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self.num_preemptions = 0
        self.num_generated_tokens = 0
        # Prefix caching: tokens of admitted sequences looked up, and those found cached.
        self.prefix_cache_query_tokens = 0
        self.prefix_cache_hit_tokens = 0
        self._arrivals = 0

    # ---- requests in and out -------------------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a sequence; KVCacheTooSmallError if it could never fit the cache."""
        if seq.seq_id in self.seqs:
            raise ValueError(f"request {seq.seq_id} is already queued")
        self._check_fits(seq)
        seq.status = SequenceStatus.WAITING
        self.seqs[seq.seq_id] = seq
        bisect.insort(self.waiting, seq, key=SORT_KEY)

    def max_cached_tokens(self, seq: Sequence) -> int:
        """The most tokens `seq` will hold in the cache: all but its last one (sampled when it
        finishes, never computed), within max_model_len."""
        return min(seq.num_prompt_tokens + seq.sampling.max_tokens, self.max_model_len) - 1

    def _check_fits(self, seq: Sequence) -> None:
        """Refuse a sequence that needs more blocks than the whole cache has. Admitted, it
        would grow until no block is left, preempt itself, be re-admitted and grow again, for
        ever. Below this bound a sequence alone in the cache always finishes, so preemption
        can always make progress."""
        manager = self.block_manager
        tokens = self.max_cached_tokens(seq)
        if cdiv(tokens, manager.block_size) <= manager.num_blocks:
            return
        capacity = manager.num_blocks * manager.block_size
        raise KVCacheTooSmallError(
            f"request {seq.seq_id}: needs KV-cache room for {tokens} tokens (a prompt of"
            f" {seq.num_prompt_tokens} and up to {seq.sampling.max_tokens} new tokens, within"
            f" max_model_len {self.max_model_len}), but the whole cache holds {capacity} tokens"
            f" ({manager.num_blocks} blocks of {manager.block_size}). Lower max_tokens or the"
            " prompt, or give the cache more memory: raise engine.kv_cache_memory_fraction (or"
            " engine.num_kv_blocks), or use model.dtype float16 or int8 (smaller weights leave"
            " the cache more room; float16 also halves a float32 cache)."
        )

    def next_arrival(self) -> int:
        """A monotonically increasing admission stamp for a new sequence."""
        self._arrivals += 1
        return self._arrivals

    def abort(self, seq_id: str) -> Sequence | None:
        """Forget a sequence wherever it is; return it, or None if unknown. Idempotent."""
        seq = self.seqs.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = "cancelled"
        return seq

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # ---- scheduling ----------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Pick this step's chunks; may preempt running sequences to make room."""
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        lane = self._low_lane()
        manager = self.block_manager
        size = manager.block_size
        # This loop runs for every sequence of the batch every step, and at a batch of 256 the
        # host's work sets the pace of a decode step: plain attribute reads, no calls where
        # the usual case (a decode token inside a block the sequence holds) needs none.
        queue = sorted(self.running, key=SORT_KEY)
        kept: list[Sequence] = []
        i, end = 0, len(queue)  # queue[end:] was preempted (newest lowest first)
        while i < end:
            seq = queue[i]
            i += 1
            low = lane.limited and seq.priority > 0  # held to the fast lane
            if seq.finishing or budget == 0 or (low and not lane.open):
                kept.append(seq)  # sits this step out, keeping its blocks and slot
                continue
            num = len(seq.token_ids) - seq.num_computed_tokens
            if num > budget:
                num = budget
            if low and num > lane.tokens:
                num = lane.tokens
            target = seq.num_computed_tokens + num
            if target > len(seq.block_table) * size:
                while not manager.can_grow(seq, target) and i < end:
                    end -= 1
                    self._preempt(queue[end], out)
                if not manager.can_grow(seq, target):
                    self._preempt(seq, out)
                    continue
            self._schedule(seq, num, out)
            budget -= num
            if low:
                lane.take(num)
            kept.append(seq)
        self.running = kept

        # Admitting while preempting would only thrash: the preempted would evict the admitted.
        if not out.preempted:
            budget = self._admit(budget, out, lane)
        self._fit_step_size(out, self.max_num_batched_tokens - budget)
        out.admission_possible = self._head_may_be_admitted(lane)
        self._advance(out)
        return out

    def _advance(self, out: SchedulerOutput) -> None:
        """Move the step's sequences on as if it had run: their computed tokens, and a
        PLACEHOLDER for each token it samples, which postprocess replaces with the real one.
        So the next step can be scheduled, and launched, while this one runs: a sequence in
        decode then computes its placeholder, its input taken from this step's tokens on the
        device (`input_from`). A sequence whose sampled token will be its last (max_tokens or
        max_model_len, whatever the token) is not scheduled again."""
        sampled = 0
        max_model_len = self.max_model_len
        for chunk in out.chunks:
            seq = chunk.seq
            tokens = seq.token_ids
            if seq.num_pending and chunk.start >= len(tokens) - seq.num_pending:
                chunk.input_from = seq.sample_index  # the step before's last token of seq
            seq.num_computed_tokens = chunk.start + chunk.num_tokens
            if not chunk.samples:
                continue
            tokens.append(PLACEHOLDER)
            seq.num_pending += 1
            seq.sample_index = sampled
            sampled += 1
            length = len(tokens)
            seq.finishing = (length - seq.num_prompt_tokens >= seq.sampling.max_tokens
                             or length >= max_model_len)

    def _fit_step_size(self, out: SchedulerOutput, total: int) -> None:
        """Trim the step's last low prefill chunk so that the step holds exactly the largest
        padded size below it, where the tokens given back to the next step are fewer than the
        padding up to the next size would be. The chunk keeps the blocks taken for its tokens
        (it computes them next step); a chunk that no longer reaches its sequence's end no
        longer samples. High chunks are never trimmed: a high prompt cut short would wait a
        whole step for its first token. `total`: the step's tokens."""
        sizes = self.step_token_sizes
        if not sizes or total == len(out.chunks):
            return  # no padded sizes, or a pure decode step (the decode graphs' batch sizes)
        i = bisect.bisect_left(sizes, total)
        if i == 0 or i == len(sizes) or sizes[i] == total:
            return
        excess = total - sizes[i - 1]
        if excess >= sizes[i] - total:
            return
        for chunk in reversed(out.chunks):
            if chunk.seq.priority > 0 and chunk.num_tokens > excess:
                chunk.num_tokens -= excess
                chunk.samples = chunk.start + chunk.num_tokens == chunk.seq.num_tokens
                return

    def _head_may_be_admitted(self, lane: _LowLane) -> bool:
        """Whether the next step may admit the first waiting sequence: it has a running slot
        it may take and, if low, the fast lane is not already spent by the running low
        sequences (they take it first next step too). The slots reserved for high work do not
        count for a low head. Either way a flood of low work waiting does not make the next
        step's batch any different, so the runner may launch it ahead."""
        if not self.waiting:
            return False
        head = self.waiting[0]
        if head.num_pending:
            return False
        if len(self.running) >= self._slots_for(head):
            # a high head may still take a slot from low work the lane holds back
            return head.priority == 0 and lane.limited
        return head.priority == 0 or lane.open

    def _slots_for(self, seq: Sequence) -> int:
        """Running sequences at most beside which `seq` may be admitted: all of them for high
        work, those not reserved for it for low work."""
        return (
            self.max_num_seqs if seq.priority == 0 else self.max_num_seqs - self.reserved_high_slots
        )

    def _low_lane(self) -> _LowLane:
        """This step's limits on low work: the fast lane's while high work is present, and
        for lane_linger_steps steps after it has left. Called once a step."""
        high = any(s.priority == 0 for s in self.running) or bool(
            self.waiting and self.waiting[0].priority == 0
        )
        if high:
            self._lane_lingers = self.lane_linger_steps
        elif self._lane_lingers > 0:
            self._lane_lingers -= 1
        else:
            self.high_work = False
            return _LowLane(None, None)
        self.high_work = True
        return _LowLane(self.low_seqs_while_high, self.low_tokens_while_high)

    def _admit(self, budget: int, out: SchedulerOutput, lane: _LowLane) -> int:
        """Admit waiting sequences into the step within `budget` tokens; return what is left
        of it."""
        manager = self.block_manager
        # Hashes of the full blocks running sequences are yet to compute (prefix caching).
        pending: set[int] | None = None
        # Blocks the running sequences' next decode step needs, kept up to date as sequences
        # are admitted (summed once, not once per admission: a step admits dozens into a batch
        # of hundreds); None after a preemption changed the running set.
        reserve: int | None = None
        while self.waiting and budget > 0:
            seq = self.waiting[0]
            if (len(self.running) >= self._slots_for(seq)
                    and not self._free_slot_for(seq, out, lane)):
                break  # waiting is sorted, so nothing behind it may take a slot either
            if seq.priority > 0 and not lane.open:
                break  # and behind a low sequence there is only low work
            if seq.num_pending:
                break  # preempted this step: its last token is not known yet (FIFO)
            # Preempting only lowers reference counts, so the cached prefix stays the same.
            cached = manager.match_prefix(seq)
            if manager.enable_caching:
                if pending is None:
                    pending = {h for s in self.running for h in manager.uncomputed_block_hashes(s)}
                if self._awaits_pending(seq, len(cached), pending):
                    break  # FIFO; whatever shares its prefix behind it would wait too
            num = min(seq.num_tokens - len(cached) * self.block_manager.block_size, budget)
            if seq.priority > 0:
                num = min(num, lane.tokens)
            if reserve is None:
                reserve = self._decode_reserve()
            if not self._can_admit(seq, cached, num, reserve):
                budget += self._evict_lower(seq, cached, num, out)
                reserve = self._decode_reserve()
                if not self._can_admit(seq, cached, num, reserve):
                    break  # FIFO: nothing overtakes the head of the queue
            self.waiting.pop(0)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            manager.share(seq, cached)
            seq.num_computed_tokens = len(cached) * manager.block_size
            self.prefix_cache_query_tokens += seq.num_tokens
            self.prefix_cache_hit_tokens += seq.num_computed_tokens
            self._schedule(seq, num, out)
            reserve += manager.blocks_needed(seq, seq.num_tokens + 1)
            budget -= num
            if seq.priority > 0:
                lane.take(num)
            if pending is not None:
                pending.update(manager.uncomputed_block_hashes(seq))
        return budget

    def _free_slot_for(self, seq: Sequence, out: SchedulerOutput, lane: _LowLane) -> bool:
        """Free a running slot for a waiting high sequence while the fast lane holds low work
        back: the low sequences beyond the lane keep their slots without computing, and only
        the few in the lane finish, so a high sequence waiting for one of their slots would
        wait for a low job to run its course at the lane's pace (with no slots reserved for
        high work, a whole batch of low jobs). The newest lowest-priority running sequence
        that sits this step out is preempted, as one is for cache blocks. Returns whether a
        slot was freed."""
        if seq.priority != 0 or not lane.limited:
            return False
        computing = {chunk.seq for chunk in out.chunks}
        # (not one whose last token is on its way: its slot is free after the next postprocess)
        idle = [s for s in self.running
                if s.priority > seq.priority and s not in computing and not s.finishing]
        if not idle:
            return False
        victim = max(idle, key=SORT_KEY)
        self.running.remove(victim)
        self._preempt(victim, out)
        return True

    def _awaits_pending(self, seq: Sequence, num_cached_blocks: int, pending: set[int]) -> bool:
        """Whether `seq` should wait for blocks that running sequences are computing now or
        soon: those following its cached ones that it could share (not the block of its last
        token), when they are at least as many tokens as it would still compute. Waiting costs
        it a step or so; sharing a short common start (a chat header) is not worth that. A hash
        names the tokens from the start, so a collision here only costs a step of waiting."""
        size = self.block_manager.block_size
        limit = (seq.num_tokens - 1) // size
        if num_cached_blocks >= limit:
            return False
        hashes = block_hashes(seq, size, limit)
        shared = num_cached_blocks
        while shared < limit and hashes[shared] in pending:
            shared += 1
        return (shared - num_cached_blocks) * size >= seq.num_tokens - shared * size

    def _decode_reserve(self) -> int:
        """Blocks the running sequences' next decode step needs."""
        manager = self.block_manager
        return sum(manager.blocks_needed(s, s.num_tokens + 1) for s in self.running)

    def _can_admit(
        self, seq: Sequence, cached: list[int], num_tokens: int, reserve: int | None = None
    ) -> bool:
        """Whether `seq`, sharing the `cached` blocks, can take blocks for `num_tokens` more
        tokens and still leave the running sequences the `reserve` blocks their next decode
        step needs (else admitting it would only get it, or them, preempted at once and its
        prefill thrown away). Sharing an evictable cached block takes it out of the free pool
        too."""
        manager = self.block_manager
        if reserve is None:
            reserve = self._decode_reserve()
        tokens = len(cached) * manager.block_size + num_tokens
        needed = cdiv(tokens, manager.block_size) - len(cached) + manager.share_cost(cached)
        return needed + reserve <= manager.num_free_blocks

    def _evict_lower(
        self, seq: Sequence, cached: list[int], num_tokens: int, out: SchedulerOutput
    ) -> int:
        """Preempt running sequences of lower priority than `seq` (newest lowest first) until
        `seq` can share `cached` and have blocks for `num_tokens` more; return the token budget
        freed by doing so."""
        victims = sorted(
            (s for s in self.running if s.priority > seq.priority),
            key=SORT_KEY,
        )
        freed = 0
        while victims and not self._can_admit(seq, cached, num_tokens):
            victim = victims.pop()
            self.running.remove(victim)
            for i, chunk in enumerate(out.chunks):
                if chunk.seq is victim:
                    freed += chunk.num_tokens
                    victim.ever_scheduled = not chunk.first_time
                    del out.chunks[i]
                    break
            self._preempt(victim, out)
        return freed

    def _schedule(self, seq: Sequence, num_tokens: int, out: SchedulerOutput) -> None:
        start = seq.num_computed_tokens
        target = start + num_tokens
        manager = self.block_manager
        if target > len(seq.block_table) * manager.block_size:
            manager.grow(seq, target)
        samples = target == len(seq.token_ids)
        if (
            samples
            and target % manager.block_size == 0
            and target < self.max_model_len
            and manager.can_grow(seq, target + 1)
        ):
            # The block the sampled token will need next step, one step early: the runner may
            # launch that step before this one's token reaches the host (decode lookahead).
            manager.grow(seq, target + 1)
        out.chunks.append(ScheduledChunk(seq, start, num_tokens, samples, not seq.ever_scheduled))
        seq.ever_scheduled = True

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        bisect.insort(self.waiting, seq, key=SORT_KEY)
        self.num_preemptions += 1
        out.preempted.append(seq)

    # ---- after the model ran -------------------------------------------------------------

    def postprocess(self, out: SchedulerOutput, sampled: list[int]) -> list[StepOutput]:
        """Record a step's results. `sampled` holds one token per `out.sampling_chunks`.

        The next step may already have been scheduled (and launched): a sequence this step
        finished by EOS may have a chunk in it, whose result is then dropped, and its freed
        blocks are written by that step only before any later step can reuse them (the
        device runs steps in order)."""
        tokens = iter(sampled)
        results: list[StepOutput] = []
        manager = self.block_manager
        # register_computed has work only where a block is newly complete (for a sequence in
        # decode, once every block_size tokens), so a sampled token calls it only then.
        size = manager.block_size if manager.enable_caching else 0
        finished = SequenceStatus.FINISHED
        eos = self.eos_token_ids
        generated = 0
        for chunk in out.chunks:
            seq = chunk.seq
            token = next(tokens) if chunk.samples else None
            if seq.status is finished:
                continue  # aborted, or finished by the step before while this one ran
            if token is None:
                manager.register_computed(seq)
                if chunk.first_time:
                    results.append(StepOutput(seq.seq_id, [], False, None, True))
                continue
            at = chunk.start + chunk.num_tokens  # the placeholder's index
            seq.token_ids[at] = token
            seq.num_pending -= 1
            if size and seq.num_computed_tokens // size > len(seq.block_content_ids):
                manager.register_computed(seq)  # its blocks hold known tokens only now
            generated += 1
            # Why the sequence ends with this token (None: it goes on). Its length limit was
            # known when the token was scheduled (_advance: `finishing`, and nothing after it).
            reason: FinishReason | None = None
            if token in eos and not seq.sampling.ignore_eos:
                reason = "stop"
            elif seq.finishing and at + 1 == len(seq.token_ids):
                reason = "length"
            if reason is not None:
                del seq.token_ids[at + 1 :]  # a placeholder of the step after, if any
                self._finish(seq, reason)
            results.append(
                StepOutput(seq.seq_id, [token], reason is not None, reason, chunk.first_time)
            )
        self.num_generated_tokens += generated
        return results

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:  # preempted while its last step ran
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.num_pending = 0
        self.block_manager.free(seq)
        del self.seqs[seq.seq_id]
