"""Shared fixtures: tiny Hugging Face checkpoints made on the fly (no downloads).

`hf_checkpoint(kind, ...)` saves a random tiny `transformers` model with
`save_pretrained(safe_serialization=True)` into a session tmp dir and returns the
directory; the same arguments return the same directory, so parity tests, worker
tests and CLI tests can all share one checkpoint per kind.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

# Small shapes that still exercise each feature the loader must get right.
HF_CHECKPOINT_KINDS: dict[str, dict[str, Any]] = {
    # Llama, grouped-query attention (4 query heads share 2 KV heads).
    "llama_gqa": {
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    # Llama, multi-query attention (one KV head) and Llama 3.1 rope scaling, with the
    # scaled band inside the tiny head_dim's wavelengths (8..32 positions).
    "llama_mqa_llama3": {
        "model_type": "llama",
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    },
    # Qwen2: q/k/v bias, tied embeddings, a different rope theta.
    "qwen2": {
        "model_type": "qwen2",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
        "bos_token_id": None,
        "eos_token_id": 2,
    },
    # Mistral: explicit head_dim (32, not hidden/heads = 16), no sliding window,
    # linear rope scaling.
    "mistral": {
        "model_type": "mistral",
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "sliding_window": None,
        "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    },
    # Gemma 3 (text): MQA with head_dim 256, a window of 16 with every 3rd layer
    # global, its own RoPE on the windowed layers (linear scaling on the global
    # ones), a query_pre_attn_scalar other than head_dim, soft-capped logits.
    "gemma3": {
        "model_type": "gemma3_text",
        "num_attention_heads": 4,
        "num_key_value_heads": 1,
        "head_dim": 256,
        "num_hidden_layers": 6,
        "sliding_window": 16,
        "layer_types": ["sliding_attention", "sliding_attention", "full_attention"] * 2,
        "query_pre_attn_scalar": 64,
        "final_logit_softcapping": 3.0,
        "rope_parameters": {
            "full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        },
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
}

_COMMON_CONFIG: dict[str, Any] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}

# Weights are redrawn after construction with this spread: HF zero-initialises biases
# (which would make the Qwen2 bias test vacuous) and sets norms to one; std 0.08
# keeps the top logits well apart so greedy runs are not decided by rounding.
_WEIGHT_STD = 0.08


def make_hf_checkpoint(
    path: Path,
    kind: str,
    *,
    seed: int = 0,
    max_shard_size: str | None = None,
    **config_overrides: Any,
) -> Path:
    """Save a random tiny HF checkpoint of `kind` (a key of HF_CHECKPOINT_KINDS) in `path`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    settings = {**_COMMON_CONFIG, **HF_CHECKPOINT_KINDS[kind], **config_overrides}
    model_type = settings.pop("model_type")
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator) * _WEIGHT_STD
            param.copy_(1.0 + noise if name.endswith("norm.weight") else noise)
    kwargs = {"safe_serialization": True}
    if max_shard_size is not None:
        kwargs["max_shard_size"] = max_shard_size
    model.save_pretrained(path, **kwargs)
    return path


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `hf_checkpoint(kind, seed=0, max_shard_size=None, **config_overrides)`
    -> directory of a saved tiny checkpoint, cached per argument set for the session."""
    cache: dict[tuple, Path] = {}

    def factory(kind: str, **kwargs: Any) -> Path:
        key = (kind, tuple(sorted((k, repr(v)) for k, v in kwargs.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"hf-{kind}")
            cache[key] = make_hf_checkpoint(path, kind, **kwargs)
        return cache[key]

    return factory
