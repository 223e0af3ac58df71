"""Builds a native model from a Hugging Face folder: config.json plus one or many *.safetensors.

The model is built on the meta device (no memory), its parameters are then allocated empty on
the target device in the target dtype, and every checkpoint tensor is read through a memory-map
(safetensors `safe_open`) slice by slice by the owning layer's `weight_loader`, which takes only
its rank's part. No second full copy of the weights is ever held in host memory.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from engine.distributed import LayerSplit, ParallelGroup
from engine.layers.attention import PagedAttention
from engine.layers.linear import LinearBase, load_slice
from engine.models import CausalLM, model_class

log = logging.getLogger(__name__)

# Checkpoint tensors that are recomputed here rather than loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def checkpoint_files(model_path: str | Path) -> list[Path]:
    """The checkpoint's safetensors files (from the shard index when there is one)."""
    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [root / name for name in sorted(set(weight_map.values()))]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {root}")
    return files


def build_model(
    hf_config: Any,
    group: ParallelGroup,
    attention: PagedAttention,
    max_positions: int,
    split_layers: bool = False,
    triton: bool = False,
) -> CausalLM:
    """The architecture's module on the meta device (parameters have shapes, no storage).

    The group shards every layer (tensor parallel), or with split_layers gives each rank
    consecutive whole layers (engine.distributed.LayerSplit). With `triton` the layers run
    their Triton kernels (the GPU path)."""
    architectures = getattr(hf_config, "architectures", None) or []
    if not architectures:
        raise ValueError("config.json names no architecture")
    if getattr(hf_config, "quantization_config", None):
        raise ValueError("quantised checkpoints are not supported by the native backend")
    cls = model_class(architectures[0])
    args = cls.args_class.from_hf(hf_config)
    if split_layers:
        split, tensor_group = LayerSplit.of(group, args.num_layers), ParallelGroup()
    else:
        split, tensor_group = LayerSplit.whole(args.num_layers), group
    with torch.device("meta"):
        model = cls(args, tensor_group, attention, max_positions, split, triton=triton)
    model.tie_weights()
    return model


def quantize_int8(model: nn.Module) -> None:
    """Make every linear layer weight-only int8 (on the meta device, before loading); the
    embeddings and the vocabulary head stay in the model dtype."""
    for module in model.modules():
        if isinstance(module, LinearBase):
            module.quantize_int8()


def materialise(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter and buffer empty storage on device: floating-point
    parameters in dtype, the rest (int8 weights) and buffers in their own dtype; tied
    parameters stay tied."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) not in made:
                kind = dtype if param.is_floating_point() else param.dtype
                empty = torch.empty(param.shape, dtype=kind, device=device)
                made[id(param)] = nn.Parameter(empty, requires_grad=False)
            module._parameters[name] = made[id(param)]
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = torch.empty(buf.shape, dtype=buf.dtype, device=device)


@torch.inference_mode()
def load_weights(model: CausalLM, model_path: str | Path) -> None:
    """Copy every checkpoint tensor into its (possibly fused, possibly sharded) parameter."""
    params = dict(model.named_parameters())
    packed = model.packed_modules
    shards_of = Counter(target for target, _ in packed.values())
    loaded: Counter[str] = Counter()
    for file in checkpoint_files(model_path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                target = None if key.endswith(IGNORED_SUFFIXES) else model.checkpoint_target(key)
                if target is None:  # recomputed, or not held by this rank
                    continue
                name, shard = target, None
                for ckpt_module, (module_name, shard_id) in packed.items():
                    if f".{ckpt_module}." in target:
                        name = target.replace(f".{ckpt_module}.", f".{module_name}.")
                        shard = shard_id
                        break
                if name not in params:
                    raise ValueError(f"{file.name}: tensor {key} has no place in the model")
                module = model.get_submodule(name.rsplit(".", 1)[0])
                weight_loader = getattr(module, "weight_loader", None)
                tensor = f.get_slice(key)
                if weight_loader is None:
                    load_slice(params[name], tensor, None, 0, 0)
                else:
                    weight_loader(params[name], tensor, shard)
                loaded[name] += 1
    missing = []
    for name in params:
        if name.endswith(".weight_scale"):
            continue  # filled with its int8 weight
        module_name = name.rsplit(".", 2)[-2]
        if loaded[name] < shards_of.get(module_name, 1):
            missing.append(name)
    if missing:
        raise ValueError(
            f"checkpoint {model_path} lacks tensors for: {missing[:8]}"
            + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        )


def load_model(
    hf_config: Any,
    model_path: str | Path,
    dtype: torch.dtype,
    device: torch.device,
    group: ParallelGroup,
    attention: PagedAttention,
    max_positions: int,
    int8: bool = False,
    split_layers: bool = False,
    triton: bool = False,
) -> CausalLM:
    """Build, allocate and load the model for this rank; returns it in eval mode.

    Args:
        hf_config: the transformers config of the checkpoint.
        dtype: of the activations and the unquantised weights.
        group: the ranks the model is sharded over.
        max_positions: longest sequence the position tables must cover.
        int8: weight-only int8 linear layers (quantised per output row while loading).
        split_layers: shard by layers (each rank holds consecutive whole layers) instead of
            slicing every layer over the group.
        triton: the layers run their Triton kernels (the GPU path).
    """
    model = build_model(hf_config, group, attention, max_positions, split_layers, triton)
    if int8:
        quantize_int8(model)
    materialise(model, device, dtype)
    load_weights(model, model_path)
    model.init_buffers()
    n = sum(p.numel() for p in model.parameters())
    log.info(
        "loaded %s: %.1fM parameters (this rank) as %s%s on %s",
        model_path,
        n / 1e6,
        dtype,
        " with int8 linear weights" if int8 else "",
        device,
    )
    model.eval()
    return model
