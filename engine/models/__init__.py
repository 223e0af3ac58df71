"""Model architectures the native backend runs, by the `architectures` name in config.json.

Importing this package does not import torch; `model_class` loads the architecture's module.
"""

from __future__ import annotations

import importlib
from typing import Any

# config.json architecture -> module under engine.models. Llama, Qwen2 and Mistral differ only
# in biases, sliding windows and defaults, which the llama module reads from the config.
ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "llama",
    "MistralForCausalLM": "llama",
}


def model_class(architecture: str) -> Any:
    """The nn.Module class that implements `architecture` (raises ValueError if none does)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(
            f"the native backend does not implement {architecture}; "
            f"supported: {sorted(ARCHITECTURES)} (use backend 'hf' for others)"
        )
    module = importlib.import_module(f"engine.models.{ARCHITECTURES[architecture]}")
    return module.MODEL_CLASS
