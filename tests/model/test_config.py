from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from model.config import ModelConfig, RopeScaling, load_config
from model.errors import ModelLoadError
from model.rope import compute_inv_freq

BASE = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "eos_token_id": 2,
    "bos_token_id": 1,
}
LLAMA3 = {
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def test_older_and_newer_rope_spellings_parse_the_same() -> None:
    older = {**BASE, "rope_theta": 500000.0, "rope_scaling": {"rope_type": "llama3", **LLAMA3}}
    newer = {**BASE, "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3}}
    expected = RopeScaling("llama3", 8.0, 1.0, 4.0, 32)
    for hf in (older, newer):
        config = ModelConfig.from_hf_dict(hf)
        assert config.rope_theta == 500000.0
        assert config.rope_scaling == expected
    # The oldest spelling of the type key is "type".
    linear = ModelConfig.from_hf_dict({**BASE, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert linear.rope_scaling == RopeScaling("linear", 2.0, original_max_position_embeddings=512)
    assert linear.rope_theta == 10000.0


def test_fields_parsed() -> None:
    config = ModelConfig.from_hf_dict(
        {**BASE, "head_dim": 32, "tie_word_embeddings": True, "rms_norm_eps": 1e-5}
    )
    assert (config.head_dim, config.num_kv_heads, config.num_queries_per_kv) == (32, 2, 2)
    assert config.tie_word_embeddings is True
    assert config.rms_norm_eps == 1e-5
    assert config.eos_token_ids == (2,)
    assert config.attention_bias is False
    qwen = ModelConfig.from_hf_dict(
        {**BASE, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 64}
    )
    assert qwen.attention_bias is True  # Qwen2 always has qkv bias
    assert qwen.head_dim == 16


def test_generation_config_adds_eos_ids(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(BASE))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_config(tmp_path).eos_token_ids == (2, 7)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"architectures": ["GPT2LMHeadModel"]}, "unsupported architecture 'GPT2LMHeadModel'"),
        ({"sliding_window": 128}, "unsupported sliding_window 128"),
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope type 'yarn'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        ({"num_key_value_heads": 3}, "multiple of num_kv_heads"),
        ({"vocab_size": None}, "bad value"),
        # Found by tests/fuzz/fuzz_checkpoint.py: a ZeroDivisionError, an
        # OverflowError, NaNs that passed `<= 0`, a tensor list sized by a claim.
        ({"num_attention_heads": 0}, "bad value"),
        ({"vocab_size": float("inf")}, "bad value"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps and rope_theta must be > 0"),
        ({"num_hidden_layers": 10**9}, "num_layers is 1000000000; at most 1024"),
        ({"architectures": 8}, "must name exactly one architecture"),
    ],
)
def test_unsupported_configs_raise_one_line(change, needle) -> None:
    with pytest.raises(ModelLoadError) as info:
        ModelConfig.from_hf_dict({**BASE, **change})
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_missing_field_is_named() -> None:
    hf = dict(BASE)
    del hf["intermediate_size"]
    with pytest.raises(ModelLoadError, match="missing 'intermediate_size'"):
        ModelConfig.from_hf_dict(hf)


@pytest.mark.parametrize(
    "rope_parameters",
    [
        {"rope_type": "default", "rope_theta": 10000.0},
        {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        {"rope_type": "llama3", "rope_theta": 500000.0, **LLAMA3},
    ],
    ids=["default", "linear", "llama3"],
)
def test_inv_freq_equals_transformers(rope_parameters) -> None:
    hf_config = LlamaConfig(
        **{k: v for k, v in BASE.items() if k != "architectures"},
        rope_parameters=dict(rope_parameters),
    )
    rope_type = rope_parameters["rope_type"]
    if rope_type == "default":
        expected = 1.0 / (10000.0 ** (torch.arange(0, 16, 2, dtype=torch.int64).float() / 16))
    else:
        expected, _ = ROPE_INIT_FUNCTIONS[rope_type](hf_config, "cpu")
    config = ModelConfig.from_hf_dict({**BASE, "rope_parameters": rope_parameters})
    ours = compute_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling)
    assert torch.equal(ours, expected)
    if rope_type != "default":
        plain = compute_inv_freq(config.head_dim, config.rope_theta, None)
        assert not torch.equal(ours, plain)  # the scaling really changed something
