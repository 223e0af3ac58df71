"""Facts read from a checkpoint folder that every backend needs: that it is one, and its EOS
ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.request import EngineError


def require_checkpoint(model_path: str) -> None:
    """Refuse a model path that is not a checkpoint folder, saying what is expected (the
    loaders would otherwise take it for a hub id and fail with a message about repo ids)."""
    folder = Path(model_path)
    if not (folder / "config.json").is_file():
        what = "has no config.json" if folder.is_dir() else "does not exist"
        raise EngineError(
            f"model path {model_path}: {what}; give the folder of a Hugging Face checkpoint"
            " (config.json, *.safetensors, tokenizer files). Hub ids are not downloaded:"
            " fetch the model first (e.g. `huggingface-cli download ID --local-dir DIR`)"
        )


def eos_token_ids(model_path: str | Path, hf_config: Any, tokenizer: Any = None) -> frozenset[int]:
    """EOS ids from config.json, generation_config.json (chat models often add one there) and,
    when given, the tokenizer."""
    ids: set[int] = set()

    def add(value: Any) -> None:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))

    add(getattr(hf_config, "eos_token_id", None))
    generation = Path(model_path) / "generation_config.json"
    if generation.exists():
        add(json.loads(generation.read_text()).get("eos_token_id"))
    if tokenizer is not None:
        add(getattr(tokenizer, "eos_token_id", None))
    return frozenset(ids)
