"""Llama-family decoder (Llama, Qwen2, Mistral): RMSNorm, RoPE, grouped-query attention with
optional QKV bias and sliding window, SwiGLU MLP, tied or untied embeddings.

Works on a flat token batch ([T] ids and positions, no padding) over a paged KV cache, with
tensor-parallel layers from engine.parallel, or only some layers (engine.parallel.LayerSplit).
Module names follow the Hugging Face checkpoint, except the fused `qkv_proj` and
`gate_up_proj` (see `packed_modules`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, PagedAttention
from engine.models import CausalLM
from engine.parallel import (
    LayerSplit,
    LinearBase,
    MergedColumnParallelLinear,
    ParallelGroup,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)

KVCache = tuple[torch.Tensor, torch.Tensor]  # keys, values: [num_blocks, block_size, Hkv, D]


@dataclass
class Rope:
    """What the attention layers rotate by: per-token cos/sin [T, 1, D] in the model dtype on
    the PyTorch path; the whole float32 tables [max_positions, D] on the fused path."""

    positions: torch.Tensor  # [T]
    cos: torch.Tensor
    sin: torch.Tensor


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


def rope_inv_freq(params: dict[str, Any], head_dim: int) -> torch.Tensor:
    """Inverse frequencies [head_dim / 2] for the checkpoint's RoPE type (float32, CPU)."""
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial rotary embeddings are not supported")
    base = float(params["rope_theta"])
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).to(torch.float) / head_dim
    inv_freq = 1.0 / (base**exponents)
    rope_type = params["rope_type"]
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / params["factor"]
    if rope_type == "llama3":
        factor = params["factor"]
        low, high = params["low_freq_factor"], params["high_freq_factor"]
        old_len = params["original_max_position_embeddings"]
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
        return torch.where(medium, smoothed, scaled)
    raise ValueError(f"RoPE type {rope_type!r} is not supported by the native backend")


class RotaryEmbedding(nn.Module):
    """cos/sin tables for every position up to max_positions, applied in the rotate-half form."""

    cos: torch.Tensor  # [max_positions, head_dim] float32
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_positions = max_positions
        self.params = params
        self.register_buffer("cos", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_positions, head_dim), persistent=False)

    def init_buffers(self) -> None:
        """(Re)compute the tables in place, on whatever device the buffers now live."""
        inv_freq = rope_inv_freq(self.params, self.head_dim).to(self.cos.device)
        t = torch.arange(self.max_positions, device=self.cos.device, dtype=torch.float)
        freqs = torch.outer(t, inv_freq)  # [P, D / 2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [P, D]
        self.cos = emb.cos()
        self.sin = emb.sin()

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [T] -> cos, sin: [T, 1, D]
        return (
            self.cos[positions].unsqueeze(1).to(dtype),
            self.sin[positions].unsqueeze(1).to(dtype),
        )


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; cos, sin: [T, 1, D]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def triton_layers() -> Any:
    """engine.triton_layers, imported on first use (the CPU path never needs Triton)."""
    from engine import triton_layers as module

    return module


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)

    fused = False  # the Triton kernel (GPU path); see LlamaForCausalLM.use_triton_kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D]; normalised in float32, scaled in the model dtype.
        if self.fused:
            return triton_layers().rms_norm(x, self.weight, self.eps)[0]
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)

    def add_forward(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x, residual: [T, D] -> (norm(x + residual), x + residual)."""
        if self.fused:
            out, summed = triton_layers().rms_norm(x, self.weight, self.eps, residual)
            assert summed is not None
            return out, summed
        summed = residual + x
        return self.forward(summed), summed


class LlamaAttention(nn.Module):
    def __init__(
        self, args: LlamaArgs, layer: int, group: ParallelGroup, attention: PagedAttention
    ) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(
            args.hidden_size, args.head_dim, args.num_heads, args.num_kv_heads, args.qkv_bias, group
        )
        self.o_proj = RowParallelLinear(
            args.num_heads * args.head_dim, args.hidden_size, args.o_bias, group
        )
        self.num_heads = self.qkv_proj.num_heads  # this rank's heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = args.head_dim
        self.scale = args.head_dim**-0.5
        self.sliding_window = args.sliding_windows[layer]
        self.attention = attention

    fused = False  # rotary and the cache write by one Triton kernel (GPU path)

    def forward(
        self,
        x: torch.Tensor,
        rope: Rope,
        cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        return self.attend(self.qkv_proj(x), rope, cache, meta)

    def attend(
        self,
        qkv: torch.Tensor,
        rope: Rope,
        cache: KVCache,
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Everything after the QKV projection: rotary, attention, output projection.

        qkv: [T, (H + 2 * Hkv) * Dh] -> [T, D]"""
        t = qkv.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)  # [T, H, Dh]
        k = k.view(t, self.num_kv_heads, self.head_dim)  # [T, Hkv, Dh]
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.fused:  # one kernel rotates q and k and writes k and v to the cache
            triton_layers().rotary_and_cache_(
                q, k, v, rope.positions, rope.cos, rope.sin, cache[0], cache[1], meta.slot_mapping
            )
            o = self.attention(q, None, None, cache[0], cache[1], meta, self.scale,
                               self.sliding_window)  # fmt: skip
        else:
            q = apply_rotary(q, rope.cos, rope.sin)
            k = apply_rotary(k, rope.cos, rope.sin)
            o = self.attention(q, k, v, cache[0], cache[1], meta, self.scale, self.sliding_window)
        return self.o_proj(o.reshape(t, q_size))


class LlamaMLP(nn.Module):
    def __init__(self, args: LlamaArgs, group: ParallelGroup) -> None:
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(
            args.hidden_size, [args.intermediate_size] * 2, args.mlp_bias, group
        )
        self.down_proj = RowParallelLinear(
            args.intermediate_size, args.hidden_size, args.mlp_bias, group
        )

    fused = False  # SiLU(gate) * up by the Triton kernel (GPU path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: [T, D] -> [T, D]
        gate_up = self.gate_up_proj(x)  # [T, 2 * I / world]
        if self.down_proj.takes_fused_gemv(gate_up):  # the activation inside the GEMV kernel
            return self.down_proj.silu_mul_forward(gate_up)
        if self.fused:
            return self.down_proj(triton_layers().silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)  # [T, I / world] each
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    def __init__(
        self, args: LlamaArgs, layer: int, group: ParallelGroup, attention: PagedAttention
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(args, layer, group, attention)
        self.mlp = LlamaMLP(args, group)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

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
        qkv_proj, norm = self.self_attn.qkv_proj, self.input_layernorm
        if qkv_proj.takes_fused_gemv(x):  # decode: the add and the norm inside the GEMV kernel
            qkv, summed = qkv_proj.gemv_forward(
                x, norm_weight=norm.weight, eps=norm.eps, residual=residual
            )
            residual = x if summed is None else summed
        else:
            if residual is None:
                residual = x
                h = norm(x)
            else:
                h, residual = norm.add_forward(x, residual)
            qkv = qkv_proj(h)
        h = self.self_attn.attend(qkv, rope, cache, meta)
        h, residual = self.post_attention_layernorm.add_forward(h, residual)
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
    ) -> None:
        super().__init__()
        self.split = split
        self.embed_tokens = (
            VocabParallelEmbedding(args.vocab_size, args.hidden_size, group)
            if split.is_first
            else None
        )
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(args, i, group, attention) if split.holds(i) else MissingLayer()
            for i in range(args.num_layers)
        )
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps) if split.is_last else None
        self.rotary_emb = RotaryEmbedding(args.head_dim, max_positions, args.rope_parameters)
        self.hidden_size = args.hidden_size
        self.fused_rope = False

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
        if self.fused_rope:  # the kernel reads the float32 tables at each position
            rope = Rope(positions, self.rotary_emb.cos, self.rotary_emb.sin)
        else:
            rope = Rope(positions, *self.rotary_emb(positions, x.dtype))
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
    """The decoder plus the vocabulary head. Build on the meta device; see engine.loader."""

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
    ) -> None:
        super().__init__()
        self.args: LlamaArgs = args
        self.layer_split = layer_split or LayerSplit.whole(args.num_layers)
        self.model = LlamaModel(args, group, attention, max_positions, self.layer_split)
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

    def use_triton_kernels(self) -> None:
        """Run norms (with the residual add), rotary embedding and the MLP's activation
        through engine.triton_layers, and decode-sized matmuls through engine.triton_gemv
        (with the norm or the activation before them fused in): the GPU path (or the CPU
        under TRITON_INTERPRET=1)."""
        self.model.fused_rope = True
        for module in self.modules():
            if isinstance(module, (RMSNorm, LlamaAttention, LlamaMLP)):
                module.fused = True
            if isinstance(module, LinearBase):
                module.gemv = True

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
