"""The vocabulary embedding and the output head, split by vocabulary rows over the ranks."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import ParallelGroup
from engine.layers.linear import CheckpointTensor, load_slice


class VocabParallelEmbedding(nn.Module):
    """Embedding rows split over ranks (the last rank's share may be padded)."""

    def __init__(self, vocab_size: int, dim: int, group: ParallelGroup):
        super().__init__()
        self.group = group
        self.vocab_size = vocab_size
        self.rows_per_rank = -(-vocab_size // group.world_size)
        self.vocab_start = group.rank * self.rows_per_rank
        self.weight = nn.Parameter(torch.empty(self.rows_per_rank, dim), requires_grad=False)

    def weight_loader(
        self, param: torch.Tensor, loaded: CheckpointTensor, shard_id: Any = None
    ) -> None:
        size = max(0, min(self.rows_per_rank, self.vocab_size - self.vocab_start))
        if size < self.rows_per_rank:
            param[size:].zero_()
        if size:
            load_slice(param, loaded, 0, self.vocab_start, size)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        # ids: [T] -> [T, D]
        if self.group.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.vocab_start
        outside = (local < 0) | (local >= self.rows_per_rank)
        x = F.embedding(local.masked_fill(outside, 0), self.weight)
        x = x.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.group.all_reduce(x)


class ParallelLMHead(VocabParallelEmbedding):
    """The output projection to vocabulary logits, split by vocabulary rows like the embedding
    (so the two can share one weight when the checkpoint ties them)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [N, D] -> logits [N, V]
        logits = F.linear(x, self.weight)  # [N, V / world]
        return self.group.all_gather(logits, dim=-1)[:, : self.vocab_size]
