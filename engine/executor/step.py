"""What the model runner reads of a scheduled step (engine.core.scheduler's output), as
protocols: the executor depends on the shape of a step, not on the scheduler."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from engine.request import SamplingParams


class StepSequence(Protocol):
    """What the runner reads of a scheduled sequence (engine.core.sequence.Sequence)."""

    @property
    def seq_id(self) -> str: ...
    @property
    def token_ids(self) -> list[int]: ...
    @property
    def block_table(self) -> list[int]: ...
    @property
    def sampling(self) -> SamplingParams: ...
    @property
    def num_prompt_tokens(self) -> int: ...


class StepChunk(Protocol):
    """Tokens [start, start + num_tokens) of `seq`, computed this step; `samples`: the chunk
    reaches the sequence's last token, so a new token is sampled after it."""

    @property
    def seq(self) -> StepSequence: ...
    @property
    def start(self) -> int: ...
    @property
    def num_tokens(self) -> int: ...
    @property
    def samples(self) -> bool: ...
    @property
    def input_from(self) -> int | None:
        """The chunk's first token is the step before's input_from-th sampled token, not on
        the host yet (engine.core.scheduler.Scheduler._advance); None: all are known."""
        ...


class ScheduledStep(Protocol):
    """One scheduled step as the runner reads it (engine.core.scheduler.SchedulerOutput)."""

    @property
    def chunks(self) -> Sequence[StepChunk]: ...
    @property
    def sampling_chunks(self) -> Sequence[StepChunk]: ...
    @property
    def admission_possible(self) -> bool:
        """Whether a waiting sequence may be admitted next step (the batch may change)."""
        ...
