"""Rotary position embedding (rotate-half form): the cos/sin tables, and each step's rotation
of the queries and keys.

The implementation is chosen when the layer is built: in PyTorch (`Rope`, per-token cos/sin in
the model dtype), or with `triton` (the GPU path) one kernel of engine.kernels.elementwise
that rotates the queries in place and writes the rotated keys and the values to the KV cache
(`FusedRope`, reading the float32 tables at each position).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


def rope_inv_freq(params: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] for the checkpoint's RoPE type (float32, CPU)."""
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    base = float(params["rope_theta"])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"RoPE type {rope_type!r} is not supported by the native backend")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_positions, applied in the rotate-half form."""

    cos: torch.Tensor  # [max_positions, head_dim] float32
    sin: torch.Tensor

    def __init__(
        self, head_dim: int, max_positions: int, params: dict[str, Any], triton: bool = False
    ) -> None:
        super().__init__()
        self.triton = triton
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.params = params
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)

    def init_buffers(self) -> None:
        """(Re)compute the tables in place, on whatever device the buffers now live."""
        inv_freq = rope_inv_freq(self.params, self.head_dim).to(self.cos.device)
        t = torch.arange(self.max_positions, device=self.cos.device, dtype=torch.float)
        freqs = torch.outer(t, inv_freq)  # [P, D / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos()
        self.sin = emb.sin()

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, 1, D]
        return (
            self.cos[positions].unsqueeze(1).to(dtype),
            self.sin[positions].unsqueeze(1).to(dtype),
        )

    def step(self, positions: torch.Tensor, dtype: torch.dtype) -> Rope:
        """The rotation of one step's tokens at `positions` ([T]), for activations of dtype."""
        if self.triton:
            return FusedRope(positions, self.cos, self.sin)
        return Rope(positions, *self(positions, dtype))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos, sin: [T, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass
class Rope:
    """One step's rotation, in PyTorch: per-token cos/sin [T, 1, D] in the model dtype."""

    positions: torch.Tensor  # [T]
    cos: torch.Tensor
    sin: torch.Tensor

    def apply(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """q: [T, H, D]; k, v: [T, Hkv, D] -> the rotated q and k, and v: what the attention
        layer stores in the cache (see engine.layers.attention.PagedAttention)."""
        return apply_rotary(q, self.cos, self.sin), apply_rotary(k, self.cos, self.sin), v


class FusedRope(Rope):
    """One step's rotation by the Triton kernel: cos/sin are the whole float32 tables
    [max_positions, D], read at each position."""

    def apply(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Rotates q in place and stores the rotated k and v at their cache slots, in one
        kernel; returns (q, None, None): the keys and values are in the cache already."""
        from engine.kernels import elementwise  # the CPU path never imports Triton

        elementwise.rotary_and_cache_(
            q, k, v, self.positions, self.cos, self.sin, k_cache, v_cache, slot_mapping
        )
        return q, None, None
