"""Model architectures the native backend runs, by the `architectures` name in config.json,
and the interface (CausalLM) the loader and runner expect of each."""

from __future__ import annotations

import abc
import importlib
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

# config.json architecture -> module under engine.models. Llama, Qwen2 and Mistral differ only
# in biases, sliding windows and defaults, which the llama module reads from the config.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "MistralForCausalLM": "llama",
}


class ModelShape(Protocol):
    """The sizes the runner needs to lay out the KV cache and read the logits."""

    num_layers: int
    num_kv_heads: int  # whole model, before sharding
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool


class CausalLM(nn.Module, abc.ABC):
    """A decoder over a flat token batch and a paged KV cache.

    Subclasses are built on the meta device (see engine.loader) from `args_class.from_hf`.
    """

    args: ModelShape
    args_class: ClassVar[Any]
    # checkpoint module name -> (module name here, shard id) for projections fused here.
    packed_modules: ClassVar[dict[str, tuple[str, Any]]] = {}

    def tie_weights(self) -> None:
        """Share the embedding and output weights when the checkpoint ties them."""

    def init_buffers(self) -> None:
        """Compute non-persistent buffers (position tables) once storage exists."""

    @abc.abstractmethod
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [N, D] -> logits: [N, V]."""


def model_class(architecture: str) -> type[CausalLM]:
    """The class that implements `architecture` (raises ValueError if none does)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"the native backend does not implement {architecture}; "
            f"supported: {sorted(ARCHITECTURES)} (use backend 'hf' for others)"
        )
    module = importlib.import_module(f"engine.models.{ARCHITECTURES[architecture]}")
    cls: type[CausalLM] = module.MODEL_CLASS
    return cls
