"""`dummy:*` presets: fixed model shapes with deterministic seeded weights.

Every tensor is drawn from its own `torch.Generator`, seeded from a SHA-256 of the
preset and tensor names, so every process (a prefill worker, a decode worker, a
test) builds bit-identical weights without sharing a file, whatever order the
tensors are made in. Norms scale by one. The presets use the byte-level tokenizer.
"""

from __future__ import annotations

import hashlib

import torch

from model.config import ModelConfig, RopeScaling
from model.errors import ModelLoadError
from model.tokenizer import ByteTokenizer
from model.transformer import checkpoint_tensor_shapes

PRESET_PREFIX = "dummy:"

# std of every matrix; norms are ones. Large enough that the top logits are well
# apart (no near-ties that float rounding could flip), small enough to stay stable.
INIT_STD = 0.02

PRESETS: dict[str, ModelConfig] = {
    # For tests: GQA, two layers, vocab = bytes + BOS/EOS/pad.
    "tiny": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=ByteTokenizer.VOCAB_SIZE,
        hidden_size=128,
        intermediate_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        bos_token_id=ByteTokenizer.BOS_ID,
        eos_token_ids=(ByteTokenizer.EOS_ID,),
    ),
    # SmolLM-135M's shape (HuggingFaceTB/SmolLM-135M config.json), for benchmarks.
    "135m": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=49152,
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=ByteTokenizer.BOS_ID,
        eos_token_ids=(ByteTokenizer.EOS_ID,),
    ),
    # Llama-3.2-1B's shape (meta-llama/Llama-3.2-1B config.json), for the GPU check.
    "1b": ModelConfig(
        architecture="LlamaForCausalLM",
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        rope_scaling=RopeScaling("llama3", 32.0, 1.0, 4.0, 8192),
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        bos_token_id=ByteTokenizer.BOS_ID,
        eos_token_ids=(ByteTokenizer.EOS_ID,),
    ),
    # Gemma-3-270M's shape (google/gemma-3-270m config.json), for benchmarks: MQA with
    # head_dim 256, a 512-token window on 5 of every 6 layers, GeGLU, 262,144 tokens.
    "gemma3-270m": ModelConfig(
        architecture="Gemma3ForCausalLM",
        vocab_size=262144,
        hidden_size=640,
        intermediate_size=2048,
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        rms_norm_eps=1e-6,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        tie_word_embeddings=True,
        bos_token_id=ByteTokenizer.BOS_ID,
        eos_token_ids=(ByteTokenizer.EOS_ID,),
        layer_windows=tuple(0 if (i + 1) % 6 == 0 else 512 for i in range(18)),
        hidden_act="gelu_pytorch_tanh",
        norm_weight_offset=1.0,
        has_qk_norm=True,
        has_sandwich_norms=True,
        embedding_scale=640**0.5,
        query_pre_attn_scalar=256.0,
        local_rope_theta=10000.0,
    ),
}


def is_preset(spec: str) -> bool:
    return spec.startswith(PRESET_PREFIX)


def preset_config(spec: str) -> ModelConfig:
    """The config of `dummy:<name>`; `ModelLoadError` for an unknown name."""
    name = spec.removeprefix(PRESET_PREFIX)
    if name not in PRESETS:
        known = ", ".join(PRESET_PREFIX + n for n in PRESETS)
        raise ModelLoadError(f"unknown preset {spec!r} (known: {known})")
    return PRESETS[name]


def preset_tensors(spec: str) -> dict[str, torch.Tensor]:
    """float32 CPU tensors of the preset under HF checkpoint names."""
    config = preset_config(spec)
    tensors = {}
    for name, shape in checkpoint_tensor_shapes(config).items():
        if name.endswith("norm.weight"):
            # A scale of one: Gemma's norms scale by 1 + weight.
            tensors[name] = torch.full(shape, 1.0 - config.norm_weight_offset)
            continue
        generator = torch.Generator().manual_seed(_tensor_seed(spec, name))
        tensors[name] = torch.randn(shape, generator=generator) * INIT_STD
    return tensors


def _tensor_seed(spec: str, tensor_name: str) -> int:
    digest = hashlib.sha256(f"{spec}/{tensor_name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
