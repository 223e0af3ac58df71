"""Which device the engine runs on."""

from __future__ import annotations

import torch

from engine.request import EngineError


def resolve_device(name: str) -> torch.device:
    """"cpu", "cuda" or "auto" (cuda when available). "cuda" is this process's current device:
    a rank of a sharded group selects its own (torch.cuda.set_device) before building."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"device {name!r} asked for, but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device
