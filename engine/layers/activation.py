"""The gated activation of SwiGLU MLPs: SiLU(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class SiluAndMul(nn.Module):
    """x: [T, 2I] (gate | up) -> SiLU(gate) * up: [T, I].

    With `triton` (the GPU path) one kernel of engine.kernels.elementwise, rounded as F.silu's
    output is here.
    """

    def __init__(self, triton: bool = False) -> None:
        super().__init__()
        self.triton = triton

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.triton:
            from engine.kernels import elementwise  # the CPU path never imports Triton

            return elementwise.silu_and_mul(x)
        gate, up = x.chunk(2, dim=-1)  # [T, I] each
        return F.silu(gate) * up
