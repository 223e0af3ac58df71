"""Llama-family decoder (Llama, Qwen2, Mistral): RMSNorm, RoPE, grouped-query attention with
optional QKV bias and sliding window, SwiGLU MLP, tied or untied embeddings.

Works on a flat token batch ([T] ids and positions, no padding) over a paged KV cache, with
the tensor-parallel layers of engine.layers, or only some layers (engine.distributed.LayerSplit).
Module names follow the Hugging Face checkpoint, except the fused `qkv_proj` and
`gate_up_proj` (see `packed_modules`).

Kernels are the layers' choice, made when the model is built (`triton`: the GPU path); the
model's own code is the same on every path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from engine.distributed import LayerSplit, ParallelGroup
from engine.layers.activation import SiluAndMul
from engine.layers.attention import AttentionMetadata, PagedAttention
from engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import Rope, RotaryEmbedding
from engine.models import CausalLM

KVCache = tuple[torch.Tensor, torch.Tensor]  # keys, values: [num_blocks, block_size, Hkv, D]


@dataclass
class LlamaArgs:
    """The architecture's hyper-parameters, read from a transformers config."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_parameters: dict[str, Any]
    tie_word_embeddings: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    sliding_windows: list[int | None]  # per layer; None is full attention
    max_position_embeddings: int

    @classmethod
    def from_hf(cls, config: Any) -> LlamaArgs:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"unsupported hidden_act {act!r} (the Llama family uses silu)")
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        num_layers = config.num_hidden_layers
        qwen2 = config.model_type == "qwen2"
        attention_bias = bool(getattr(config, "attention_bias", False))
        return cls(
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            rope_parameters=rope_parameters(config),
            tie_word_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            sliding_windows=sliding_windows(config, num_layers),
            max_position_embeddings=config.max_position_embeddings,
        )


def rope_parameters(config: Any) -> dict[str, Any]:
    """RoPE settings: transformers >= 5 keeps them in `rope_parameters`; older configs in
    `rope_theta` plus an optional `rope_scaling`."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if not params:
        params = dict(getattr(config, "rope_scaling", None) or {})
        params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings", config.max_position_embeddings)
    return params


def sliding_windows(config: Any, num_layers: int) -> list[int | None]:
    """Each layer's attention window: Qwen2 marks layers in `layer_types` (and only when
    `use_sliding_window`); Mistral applies `sliding_window` to every layer; Llama has none
    (a stray `sliding_window` in a Llama config is ignored, as transformers does)."""
    window = getattr(config, "sliding_window", None)
    full: list[int | None] = [None] * num_layers
    if not window or config.model_type == "llama":
        return full
    if config.model_type == "qwen2":
        if not getattr(config, "use_sliding_window", False):
            return full
        layer_types = getattr(config, "layer_types", None) or []
        return [window if t == "sliding_attention" else None for t in layer_types] or full
    return [window] * num_layers


class LlamaAttention(nn.Module):
    def __init__(
        self,
        args: LlamaArgs,
        layer: int,
        group: ParallelGroup,
        attention: PagedAttention,
        triton: bool,
    ) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads, args.qkv_bias,
            group, triton,
        )  # fmt: skip
        self.o_proj = RowParallelLinear(
            args.num_heads * args.head_dim, args.hidden_size, args.o_bias, group, triton
        )
        self.num_heads = self.qkv_proj.num_heads  # this rank's heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.sliding_window = args.sliding_windows[layer]
        self.attention = attention

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        return self.o_proj(self.attend(self.qkv_proj(x), rope, cache, meta))

    def attend(
        self,
        qkv: torch.Tensor,
        rope: Rope,
        cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Everything between the QKV and the output projections: rotary, attention.

        qkv: [T, (H + 2 * Hkv) * Dh] -> [T, H * Dh] (this rank's heads)"""
        t = qkv.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # [T, H, Dh]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, Dh]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        # k, v: None when the rotation has already stored them in the cache (fused kernel).
        q, k_new, v_new = rope.apply(q, k, v, cache[0], cache[1], meta.slot_mapping)
        o = self.attention(
            q, k_new, v_new, cache[0], cache[1], meta, self.scale, self.sliding_window
        )
        return o.reshape(t, q_size)


class LlamaMLP(nn.Module):
    def __init__(self, args: LlamaArgs, group: ParallelGroup, triton: bool) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            args.hidden_size, [args.intermediate_size] * 2, args.mlp_bias, group, triton
        )
        self.down_proj = RowParallelLinear(
            args.intermediate_size, args.hidden_size, args.mlp_bias, group, triton
        )
        self.act_fn = SiluAndMul(triton)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        gate_up = self.gate_up_proj(x)  # [T, 2 * I / world]
        return self.down_proj.silu_mul_forward(gate_up, self.act_fn)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self,
        args: LlamaArgs,
        layer: int,
        group: ParallelGroup,
        attention: PagedAttention,
        triton: bool,
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, layer, group, attention, triton)
        self.mlp = LlamaMLP(args, group, triton)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, triton)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps, triton)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rope: Rope,
        cache: KVCache,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # x: [T, D], the last layer's output; residual: [T, D], the stream before it (None at
        # the first layer). Returns this layer's (output, residual); the stream is their sum,
        # added in the next norm.
        qkv, residual = self.self_attn.qkv_proj.norm_forward(x, residual, self.input_layernorm)
        o = self.self_attn.attend(qkv, rope, cache, meta)
        h, residual = self.self_attn.o_proj.add_norm_forward(
            o, residual, self.post_attention_layernorm
        )
        return self.mlp(h), residual


class MissingLayer(nn.Module):
    """The place of a layer another rank holds (layer split): keeps the layers' indices, and
    so the checkpoint's names, of the ones this rank holds."""


class LlamaModel(nn.Module):
    def __init__(
        self,
        args: LlamaArgs,
        group: ParallelGroup,
        attention: PagedAttention,
        max_positions: int,
        split: LayerSplit,
        triton: bool,
    ) -> None:
        super().__init__()
        self.split = split
        self.embed_tokens = (
            VocabParallelEmbedding(args.vocab_size, args.hidden_size, group)
            if split.is_first
            else None
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(args, i, group, attention, triton)
            if split.holds(i)
            else MissingLayer()
            for i in range(args.num_layers)
        )
        self.norm = (
            RMSNorm(args.hidden_size, args.rms_norm_eps, triton) if split.is_last else None
        )
        self.rotary_emb = RotaryEmbedding(
            args.head_dim, max_positions, args.rope_parameters, triton
        )
        self.hidden_size = args.hidden_size

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden: [T, D]: the final norm's output on the last
        # rank of a layer split (or the whole model); on other ranks the residual stream
        # handed to the next rank.
        split = self.split
        if self.embed_tokens is not None:
            x = self.embed_tokens(input_ids)
        else:  # a later rank of a layer split: the previous rank's stream
            dtype = self.activation_dtype()
            x = split.recv_hidden((input_ids.shape[0], self.hidden_size), dtype, input_ids.device)
        rope = self.rotary_emb.step(positions, x.dtype)
        residual: torch.Tensor | None = None
        layers = self.layers[split.start : split.end]
        for layer, cache in zip(layers, kv_caches, strict=True):
            x, residual = layer(x, residual, rope, cache, meta)
        if self.norm is None:
            # One tensor, the stream x + residual, rounded as the next layer's add would round
            # it, so the next rank's first layer (residual None) computes exactly what it
            # would unsplit.
            stream = x if residual is None else residual + x
            split.send_hidden(stream)
            return stream
        if residual is None:
            return self.norm(x)
        return self.norm.add_forward(x, residual)[0]

    def activation_dtype(self) -> torch.dtype:
        """The activation dtype (that of the norm weights; int8 quantises linear layers only)."""
        layer = self.layers[self.split.start]
        assert isinstance(layer, LlamaDecoderLayer)
        return layer.input_layernorm.weight.dtype


class LlamaForCausalLM(CausalLM):
    """The decoder plus the vocabulary head. Build on the meta device; see
    engine.executor.loader. `triton`: the layers run their Triton kernels (the GPU path, or the
    CPU under TRITON_INTERPRET=1)."""

    args_class = LlamaArgs
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(
        self,
        args: LlamaArgs,
        group: ParallelGroup,
        attention: PagedAttention,
        max_positions: int,
        layer_split: LayerSplit | None = None,
        triton: bool = False,
    ) -> None:
        super().__init__()
        self.args: LlamaArgs = args
        self.layer_split = layer_split or LayerSplit.whole(args.num_layers)
        self.model = LlamaModel(
            args, group, attention, max_positions, self.layer_split, triton
        )
        self.lm_head = (
            ParallelLMHead(args.vocab_size, args.hidden_size, group)
            if self.layer_split.is_last
            else None
        )

    def tie_weights(self) -> None:
        embed = self.model.embed_tokens
        if self.args.tie_word_embeddings and embed is not None and self.lm_head is not None:
            self.lm_head.weight = embed.weight

    def checkpoint_target(self, key: str) -> str | None:
        split = self.layer_split
        tied = self.args.tie_word_embeddings
        if key == "lm_head.weight":  # a tied checkpoint's copy is skipped: the embedding loads
            return key if split.is_last and not tied else None
        if key == "model.embed_tokens.weight":
            if split.is_first:
                return key
            # The last rank of a split without the embedding: its tied head loads the table.
            return "lm_head.weight" if tied and split.is_last else None
        if key.startswith("model.norm."):
            return key if split.is_last else None
        if key.startswith("model.layers."):
            return key if split.holds(int(key.split(".")[2])) else None
        return key

    def init_buffers(self) -> None:
        self.model.rotary_emb.init_buffers()

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[KVCache],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # input_ids, positions: [T] -> hidden: [T, D]
        hidden: torch.Tensor = self.model(input_ids, positions, kv_caches, meta)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # hidden: [N, D] -> logits: [N, V]
        assert self.lm_head is not None, "only the last rank of a layer split has the head"
        logits: torch.Tensor = self.lm_head(hidden)
        return logits


MODEL_CLASS = LlamaForCausalLM
