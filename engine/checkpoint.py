"""Facts read from a checkpoint folder that every backend needs: that it is one, and its EOS
ids."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.request import EngineError

# Files a tokenizer may come as (a fast tokenizer's JSON, or a sentencepiece model).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")


def checkpoint_problem(model_path: str | Path) -> str | None:
    """What is wrong with a checkpoint folder (None when it has config.json, weights in
    safetensors and a tokenizer). Hub ids are not folders: they are never downloaded here."""
    folder = Path(model_path)
    if not folder.is_dir():
        hint = (" (it looks like a hub id: download the model once elsewhere, e.g. `hf download"
                " ID --local-dir DIR`, and point at the folder)"
                if len(folder.parts) == 2 and not str(model_path).startswith((".", "/")) else "")
        return f"{model_path} is not a folder{hint}"
    if not (folder / "config.json").is_file():
        return f"{model_path} has no config.json: not a Hugging Face checkpoint folder"
    if not any(folder.glob("*.safetensors")):
        return f"{model_path} has no *.safetensors weights (incomplete download?)"
    if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
        return (f"{model_path} has no tokenizer ({', '.join(_TOKENIZER_FILES)}; incomplete"
                " download?)")
    return None


def require_checkpoint(model_path: str) -> None:
    """Refuse a model path that is not a complete checkpoint folder, saying what is wrong (the
    loaders would otherwise take it for a hub id and fail with a message about repo ids)."""
    problem = checkpoint_problem(model_path)
    if problem is not None:
        raise EngineError(f"model path: {problem}")


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
