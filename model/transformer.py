"""The Llama-family decoder: RMSNorm, RoPE, SwiGLU, MHA/GQA/MQA, optional qkv bias;
and Gemma 3's variant of it (`ModelConfig`'s Gemma fields): GeGLU, RMSNorm on q and
k and around attention and the MLP, `1 + weight` norms, scaled embeddings, windowed
layers with a RoPE of their own, and soft-capped logits.

Tokens of every sequence in a step are flattened into one `[num_tokens]` batch with
no padding; which token belongs to which sequence is the attention backend's
business, so the same module runs prefill (contiguous K/V) and decode (paged K/V).

q/k/v and gate/up are fused into one matmul each: on the CPU decode path, where a
step is a handful of tokens, fewer larger matmuls are measurably faster. Checkpoints
keep the HF names; `load_checkpoint_tensors` does the fusing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import AttentionBackend
from model.config import ModelConfig
from model.rope import RotaryEmbedding, apply_rotary


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps
        self.weight_offset = weight_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and not self.weight_offset:
            # The reference's float32 arithmetic exactly, the weight in the same op.
            return F.rms_norm(x, self.weight.shape, self.weight, eps=self.eps)
        # Normalise in float32 whatever the run dtype, as the reference does; the fused
        # op is one kernel where the spelled-out formula is five.
        normed = F.rms_norm(x.float(), self.weight.shape, eps=self.eps)
        if self.weight_offset:
            # Gemma scales by (1 + weight) in float32, then casts (Llama: the reverse).
            return (normed * (self.weight_offset + self.weight.float())).to(x.dtype)
        return self.weight * normed.to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.num_heads * config.head_dim
        self.kv_size = config.num_kv_heads * config.head_dim
        self.scale = config.attention_scale
        self.window = config.window(layer_idx)
        self.qkv_proj = nn.Linear(
            config.hidden_size, self.q_size + 2 * self.kv_size, bias=config.attention_bias
        )
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=False)
        self.q_norm = self.k_norm = None
        if config.has_qk_norm:
            offset = config.norm_weight_offset
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, offset)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, offset)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionBackend,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qk, v = self.qkv_proj(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(num_tokens, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=1)
        # q and k heads side by side get one rotation: half the small ops per layer.
        qk = apply_rotary(qk, cos, sin)
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        out = attention.attend(self.layer_idx, q, k, v, self.scale, self.window)
        return self.o_proj(out.reshape(num_tokens, self.q_size))


class SwiGLU(nn.Module):
    """The gated MLP: SwiGLU, or GeGLU (tanh-approximated GELU) for Gemma."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.is_gelu = config.hidden_act == "gelu_pytorch_tanh"
        self.gate_up_proj = nn.Linear(config.hidden_size, 2 * config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        gate = F.gelu(gate, approximate="tanh") if self.is_gelu else F.silu(gate)
        return self.down_proj(gate * up)


class DecoderLayer(nn.Module):
    """Pre-norm attention and MLP, each added to the residual. Sandwich norms (Gemma):
    `post_attention_layernorm` normalises attention's output and the MLP has its own
    pre- and post-norms; otherwise `post_attention_layernorm` is the MLP's pre-norm."""

    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        hidden, eps, offset = config.hidden_size, config.rms_norm_eps, config.norm_weight_offset
        self.input_layernorm = RMSNorm(hidden, eps, offset)
        self.self_attn = SelfAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(hidden, eps, offset)
        self.mlp = SwiGLU(config)
        self.uses_local_rope = (
            config.local_rope_theta is not None and config.window(layer_idx) is not None
        )
        self.pre_feedforward_layernorm = self.post_feedforward_layernorm = None
        if config.has_sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(hidden, eps, offset)
            self.post_feedforward_layernorm = RMSNorm(hidden, eps, offset)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        attention: AttentionBackend,
    ) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(x), cos, sin, attention)
        if self.pre_feedforward_layernorm is None or self.post_feedforward_layernorm is None:
            x = x + attended
            return x + self.mlp(self.post_attention_layernorm(x))
        x = x + self.post_attention_layernorm(attended)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Transformer(nn.Module):
    """A Llama-family causal LM. Construct it, then `load_checkpoint_tensors`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_weight_offset)
        self.lm_head = (
            None
            if config.tie_word_embeddings
            else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        )
        self.rotary = RotaryEmbedding(config)
        self.local_rotary = RotaryEmbedding(config, local=True) if config.local_rope_theta else None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionBackend,
    ) -> torch.Tensor:
        """input_ids, positions: LongTensor[num_tokens] -> normed hidden [num_tokens, hidden]."""
        if input_ids.shape != positions.shape or input_ids.dim() != 1:
            raise ValueError(
                f"input_ids {tuple(input_ids.shape)} and positions {tuple(positions.shape)} "
                "must both be [num_tokens]"
            )
        x = self.embed_tokens(input_ids)
        if self.config.embedding_scale is not None:
            # In the run dtype, as the reference casts its scale to the weights'.
            x = x * torch.tensor(self.config.embedding_scale, dtype=x.dtype)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        local = self.local_rotary.cos_sin(positions, x.dtype) if self.local_rotary else None
        for layer in self.layers:
            if layer.uses_local_rope and local is not None:
                x = layer(x, *local, attention)
            else:
                x = layer(x, cos, sin, attention)
        return self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden] (rows to score, usually each sequence's last) -> float32 [n, vocab]."""
        weight = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = F.linear(hidden, weight).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    @torch.no_grad()
    def load_checkpoint_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy HF-named tensors (exactly `checkpoint_tensor_shapes(config)`) into the
        fused parameters."""
        self.embed_tokens.weight.copy_(tensors["model.embed_tokens.weight"])
        self.norm.weight.copy_(tensors["model.norm.weight"])
        if self.lm_head is not None:
            self.lm_head.weight.copy_(tensors["lm_head.weight"])
        for i, layer in enumerate(self.layers):
            prefix = f"model.layers.{i}."
            attn = layer.self_attn
            attn.qkv_proj.weight.copy_(
                torch.cat([tensors[f"{prefix}self_attn.{p}_proj.weight"] for p in "qkv"])
            )
            if attn.qkv_proj.bias is not None:
                attn.qkv_proj.bias.copy_(
                    torch.cat([tensors[f"{prefix}self_attn.{p}_proj.bias"] for p in "qkv"])
                )
            attn.o_proj.weight.copy_(tensors[f"{prefix}self_attn.o_proj.weight"])
            layer.mlp.gate_up_proj.weight.copy_(
                torch.cat(
                    [
                        tensors[f"{prefix}mlp.gate_proj.weight"],
                        tensors[f"{prefix}mlp.up_proj.weight"],
                    ]
                )
            )
            layer.mlp.down_proj.weight.copy_(tensors[f"{prefix}mlp.down_proj.weight"])
            layer.input_layernorm.weight.copy_(tensors[f"{prefix}input_layernorm.weight"])
            layer.post_attention_layernorm.weight.copy_(
                tensors[f"{prefix}post_attention_layernorm.weight"]
            )
            for name in ("pre_feedforward_layernorm", "post_feedforward_layernorm"):
                norm = getattr(layer, name)
                if norm is not None:
                    norm.weight.copy_(tensors[f"{prefix}{name}.weight"])
            for name in ("q_norm", "k_norm"):
                norm = getattr(attn, name)
                if norm is not None:
                    norm.weight.copy_(tensors[f"{prefix}self_attn.{name}.weight"])


def checkpoint_tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF checkpoint of this config must hold, by HF name, with its shape."""
    hidden, head_dim = config.hidden_size, config.head_dim
    q_size, kv_size = config.num_heads * head_dim, config.num_kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i in range(config.num_layers):
        prefix = f"model.layers.{i}."
        shapes[f"{prefix}self_attn.q_proj.weight"] = (q_size, hidden)
        shapes[f"{prefix}self_attn.k_proj.weight"] = (kv_size, hidden)
        shapes[f"{prefix}self_attn.v_proj.weight"] = (kv_size, hidden)
        if config.attention_bias:
            shapes[f"{prefix}self_attn.q_proj.bias"] = (q_size,)
            shapes[f"{prefix}self_attn.k_proj.bias"] = (kv_size,)
            shapes[f"{prefix}self_attn.v_proj.bias"] = (kv_size,)
        shapes[f"{prefix}self_attn.o_proj.weight"] = (hidden, q_size)
        shapes[f"{prefix}mlp.gate_proj.weight"] = (config.intermediate_size, hidden)
        shapes[f"{prefix}mlp.up_proj.weight"] = (config.intermediate_size, hidden)
        shapes[f"{prefix}mlp.down_proj.weight"] = (hidden, config.intermediate_size)
        shapes[f"{prefix}input_layernorm.weight"] = (hidden,)
        shapes[f"{prefix}post_attention_layernorm.weight"] = (hidden,)
        if config.has_sandwich_norms:
            shapes[f"{prefix}pre_feedforward_layernorm.weight"] = (hidden,)
            shapes[f"{prefix}post_feedforward_layernorm.weight"] = (hidden,)
        if config.has_qk_norm:
            shapes[f"{prefix}self_attn.q_norm.weight"] = (head_dim,)
            shapes[f"{prefix}self_attn.k_norm.weight"] = (head_dim,)
    return shapes


def build_transformer(
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    *,
    dtype: torch.dtype,
    device: torch.device,
) -> Transformer:
    """Allocate the model on `device` in `dtype` (no random init) and load `tensors`."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to_empty(device=device).to(dtype)
    model.rotary = RotaryEmbedding(config)  # to_empty() dropped its float32 inv_freq
    model.rotary.to(device)
    if config.local_rope_theta is not None:
        model.local_rotary = RotaryEmbedding(config, local=True).to(device)
    model.load_checkpoint_tensors(tensors)
    return model.eval().requires_grad_(False)
