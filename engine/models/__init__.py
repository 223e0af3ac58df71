"""Model architectures the native backend runs, by the `architectures` name in config.json,
and the interface (CausalLM) the loader and runner expect of each."""

from __future__ import annotations

import abc
import importlib
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from engine.distributed import LayerSplit

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

    Subclasses are built on the meta device (see engine.executor.loader) from `args_class.from_hf`
    as `cls(args, group, attention, max_positions, layer_split, triton=...)`: `group` shards every
    layer (tensor parallel; a group of one when the model is split by layers), `layer_split` says
    which layers this rank holds, `triton` whether the layers run their Triton kernels (each layer
    picks its implementation when built). The forward pass of a layer-split rank takes its input
    from the previous rank and hands its output to the next one itself; only the last rank computes
    logits.
    """

    args: ModelShape
    args_class: ClassVar[Any]
    layer_split: LayerSplit
    # checkpoint module name -> (module name here, shard id) for projections fused here.
    packed_modules: ClassVar[dict[str, tuple[str, Any]]] = {}

    def checkpoint_target(self, key: str) -> str | None:
        """The parameter here that checkpoint tensor `key` loads into (before the fusing of
        `packed_modules`), or None when this rank does not hold it (another rank's layers,
        a tied head's duplicate)."""
        return key

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
