"""One request's life inside the native backend: its tokens, its KV-cache blocks and its state.

Pure Python (the scheduler and its tests import it without torch).
"""

from __future__ import annotations

import enum

from engine.request import FinishReason, SamplingParams

# A token sampled by a step whose result has not reached the host yet (see Sequence).
PLACEHOLDER = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """A request's tokens and cache state.

    The KV cache holds the first `num_computed_tokens` of `token_ids`. A sequence whose cache
    is freed by preemption drops back to 0 computed tokens and is re-prefilled (prompt and the
    output so far) when it is scheduled again, so no output is lost or emitted twice. With
    prefix caching, a sequence admitted (or re-admitted) whose leading full blocks are cached
    shares them and starts with those tokens computed.
    """

    def __init__(
        self,
        seq_id: str,
        prompt_token_ids: list[int],
        sampling: SamplingParams,
        priority: int,
        arrival: int,
    ) -> None:
        if not prompt_token_ids:
            raise ValueError(f"request {seq_id}: empty prompt")
        self.seq_id = seq_id
        self.token_ids: list[int] = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.sampling = sampling
        self.priority = priority
        # Admission order; FIFO within a priority, and a preempted sequence keeps its place.
        self.arrival = arrival
        # Scheduling order: higher priority (lower rank) first, then older first. A plain
        # attribute (neither part changes): the scheduler sorts the running batch by it every
        # step.
        self.sort_key = (priority, arrival)
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        # Prefix caching (kept by the BlockManager): the chained hashes of the full blocks of
        # token_ids, filled as needed, and the content ids of the leading full blocks whose
        # tokens are computed, one per block, in order.
        self.block_hashes: list[int] = []
        self.block_content_ids: list[int] = []
        self.num_computed_tokens = 0
        self.finish_reason: FinishReason | None = None
        self.num_preemptions = 0
        self.ever_scheduled = False
        # Tokens sampled by steps launched but not yet postprocessed (the scheduler runs one
        # step ahead of the host's results): PLACEHOLDER entries at the end of token_ids
        # until postprocess writes the real tokens in. sample_index: the last of them is the
        # sample_index-th token its step sampled (where the next step's input comes from, on
        # the device). finishing: that token is its last (max_tokens or max_model_len), so
        # it is not scheduled again.
        self.num_pending = 0
        self.sample_index = -1
        self.finishing = False

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV is not in the cache yet (1 for a sequence in decode)."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return (
            f"Sequence({self.seq_id!r}, {self.status.value}, prio={self.priority}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens}, "
            f"blocks={len(self.block_table)})"
        )
