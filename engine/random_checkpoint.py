"""Builds randomly initialised Hugging Face checkpoints of real architectures, with a real
(byte-level BPE) tokenizer trained here, so that the demo, the tests and the benchmarks need no
model hub. Weights do not change speed; shapes do (see SHAPES).

    python -m engine.random_checkpoint OUT_DIR [--arch llama|qwen2|mistral] [--shape tiny|1b|8b]
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Architecture shapes. `tiny` is for CPU tests and the demo; 1b/8b are the benchmark shapes
# (Llama 3.2 1B / Llama 3.1 8B) of bench/.
SHAPES: dict[str, dict[str, Any]] = {
    # initializer_range 0.3 (default 0.02): a tiny random model at the default init repeats one
    # token forever; a wider init gives varied greedy outputs, which makes comparisons meaningful.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=None,
                 initializer_range=0.3),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
               tie_word_embeddings=False),
}

BOS, EOS, IM_START, IM_END = "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [BOS, EOS, IM_START, IM_END]
# ChatML; the generation prompt opens the assistant turn.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _training_corpus() -> list[str]:
    """Plain English text to train the tokenizer on: docstrings of the standard library."""
    import collections
    import json as json_mod
    import logging as logging_mod
    import pathlib
    import string
    import textwrap

    texts: list[str] = []
    for module in (collections, json_mod, logging_mod, pathlib, string, textwrap, inspect):
        for _, obj in inspect.getmembers(module):
            doc = inspect.getdoc(obj)
            if doc:
                texts.append(doc)
    texts.append("The quick brown fox jumps over the lazy dog. " * 4)
    return texts


def build_tokenizer(out_dir: Path, vocab_size: int = 1024) -> Any:
    """Train a byte-level BPE tokenizer and save it (tokenizer.json + config) into out_dir."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=EOS,
        additional_special_tokens=[IM_START, IM_END],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def build_checkpoint(
    out_dir: str | Path,
    arch: str = "llama",
    shape: str = "tiny",
    dtype: str = "float32",
    seed: int = 0,
    device: str = "cpu",
    **overrides: Any,
) -> Path:
    """Write a random checkpoint (config.json, model.safetensors, tokenizer) into out_dir.

    Args:
        arch: "llama", "qwen2" (QKV bias) or "mistral".
        shape: a key of SHAPES; overrides replace single config fields.
        device: where to initialise (the 8b shape is built fastest on a GPU).
    Returns: out_dir.
    """
    import torch
    from transformers import (
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    classes = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    if arch not in classes:
        raise ValueError(f"unknown arch {arch!r}; choose from {sorted(classes)}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose from {sorted(SHAPES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)

    fields = {**SHAPES[shape], **overrides}
    if fields.get("vocab_size") is None:
        # Round up so the embedding has room past the tokenizer, as real checkpoints do.
        fields["vocab_size"] = (len(tokenizer) + 63) // 64 * 64
    fields.setdefault("tie_word_embeddings", arch != "qwen2")
    config_cls, model_cls = classes[arch]
    config = config_cls(
        max_position_embeddings=fields.pop("max_position_embeddings", 4096),
        rope_theta=fields.pop("rope_theta", 10000.0),
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS),
        eos_token_id=tokenizer.convert_tokens_to_ids(EOS),
        pad_token_id=tokenizer.convert_tokens_to_ids(EOS),
        **fields,
    )
    torch_dtype = getattr(torch, dtype)
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_cls(config)
    model = model.to(torch_dtype)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=[config.eos_token_id, tokenizer.convert_tokens_to_ids(IM_END)],
        pad_token_id=config.pad_token_id,
    )
    model.save_pretrained(str(out))
    (out / "tideq_build.json").write_text(json.dumps({"arch": arch, "shape": shape, "seed": seed}))
    log.info("built %s/%s checkpoint in %s", arch, shape, out)
    return out


def ensure_checkpoint(out_dir: str | Path, **kwargs: Any) -> Path:
    """build_checkpoint unless out_dir already holds a complete checkpoint."""
    out = Path(out_dir)
    if (out / "config.json").exists() and (out / "tokenizer.json").exists() and any(
        out.glob("*.safetensors")
    ):
        return out
    return build_checkpoint(out, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--arch", default="llama")
    parser.add_argument("--shape", default="tiny", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    build_checkpoint(args.out_dir, args.arch, args.shape, args.dtype, args.seed, args.device)


if __name__ == "__main__":
    main()
