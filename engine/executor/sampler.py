"""Per-request sampling over a batch of logits.

Greedy rows take the argmax. Other rows are scaled by temperature, cut by top-k and top-p, and
drawn with the exponential race (argmax of p / E, E ~ Exp(1)), which is a draw from p. A row
whose request has a seed draws its noise from that request's own generator, so its output does
not depend on the other rows of the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from engine.request import SamplingParams


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A generator for a seeded request, or None (the batch-wide generator is used)."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Mask logits outside each row's top-k / top-p nucleus with -inf.

    logits: [B, V] float; top_k: [B] long (0 = off); top_p: [B] float (1.0 = off).
    Returns: [B, V], a new tensor.
    """
    vocab = logits.shape[-1]
    sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(vocab, device=logits.device).expand_as(sorted_logits)  # [B, V]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)  # [B, 1]
    remove = ranks >= k
    probs = sorted_logits.softmax(dim=-1)
    # Keep a token while the mass *before* it is below top_p. The most probable token always
    # stays, explicitly: a top_p that rounds to 0 in float32 (5e-324) would otherwise remove
    # every token, and the draw over an all -inf row is token 0.
    mass_before = probs.cumsum(dim=-1) - probs
    remove |= (mass_before >= top_p.unsqueeze(1)) & (ranks > 0)
    sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, sorted_idx, sorted_logits)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
) -> torch.Tensor:
    """Choose the next token of every row.

    logits: [B, V] (any float dtype); params, generators: one per row.
    Returns: [B] long token ids, on logits' device.
    """
    logits = logits.float()
    greedy_tokens = logits.argmax(dim=-1)  # [B]
    sampled_rows = [i for i, p in enumerate(params) if not p.greedy]
    if not sampled_rows:
        return greedy_tokens

    device = logits.device
    rows = torch.tensor(sampled_rows, device=device)
    sub = logits.index_select(0, rows)  # [S, V]
    # Not greedy, so every temperature here is >= GREEDY_TEMPERATURE: the division is finite.
    temps = torch.tensor([params[i].temperature for i in sampled_rows], device=device)
    sub = sub / temps.unsqueeze(1)
    # A top_k at or above the vocabulary keeps every token: clamped to the vocabulary, it is
    # "off" (0), so it neither triggers the sort nor reaches torch as a huge int.
    vocab = logits.shape[-1]
    top_k = torch.tensor(
        [params[i].top_k if params[i].top_k < vocab else 0 for i in sampled_rows],
        dtype=torch.long,
        device=device,
    )
    top_p = torch.tensor([params[i].top_p for i in sampled_rows], device=device)
    if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
        sub = apply_top_k_top_p(sub, top_k, top_p)
    probs = sub.softmax(dim=-1)  # [S, V]

    noise = torch.empty_like(probs)
    unseeded = [j for j, i in enumerate(sampled_rows) if generators[i] is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), probs.shape[1], device=device).exponential_()
    for j, i in enumerate(sampled_rows):
        generator = generators[i]
        if generator is not None:
            noise[j].exponential_(generator=generator)
    chosen = (probs / noise).argmax(dim=-1)  # [S]
    return greedy_tokens.index_copy(0, rows, chosen)
