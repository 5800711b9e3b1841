"""Sliding-window attention against `transformers`, on tiny random checkpoints saved
with `save_pretrained`: Mistral with `sliding_window` 32 on every layer, Qwen2
with the window on its upper layers only, and Gemma 3 (text) with a window of 16
and every third layer global. Prompts below, at and well past the
window; greedy tokens through the reference loop (contiguous K/V), the decode
engine (paged K/V), and the engine prefilling in chunks that straddle the window."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from decode_worker.engine import DecodeEngine, EngineRequest
from decode_worker.engine_config import EngineConfig
from decode_worker.scheduler import SchedulerConfig
from model.attention import ContiguousKVAttention
from model.config import ModelConfig
from model.errors import ModelLoadError
from model.generation import generate
from model.loader import LoadedModel, load_model
from model.sampling_params import SamplingParams
from tests.model.greedy import engine_greedy, hf_greedy

WINDOW = 32
PROMPT_LENS = [5, 16, 17, 100, 300]
NUM_NEW_TOKENS = 32
CHECKPOINTS = {
    "mistral-window-32": ("mistral", {"sliding_window": WINDOW}),
    # Layers 1 and 2 of 3 have the window, layer 0 sees the whole context.
    "qwen2-upper-layers": (
        "qwen2",
        {
            "use_sliding_window": True,
            "sliding_window": WINDOW,
            "max_window_layers": 1,
            "num_hidden_layers": 3,
        },
    ),
    "gemma3-window-16": ("gemma3", {}),
}
EXPECTED_WINDOWS = {
    "mistral-window-32": (WINDOW, WINDOW),
    "qwen2-upper-layers": (0, WINDOW, WINDOW),
    "gemma3-window-16": (16, 16, 0, 16, 16, 0),
}


def _prompt(prompt_len: int, vocab_size: int) -> list[int]:
    generator = torch.Generator().manual_seed(2000 + prompt_len)
    return torch.randint(3, vocab_size, (prompt_len,), generator=generator).tolist()


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def models(request, hf_checkpoint):
    kind, overrides = CHECKPOINTS[request.param]
    path = hf_checkpoint(kind, **overrides)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, reference, load_model(str(path))


def chunked_engine_greedy(loaded: LoadedModel, prompt: list[int], chunk: int) -> list[int]:
    """The decode engine prefilling `chunk` tokens per step."""
    config = EngineConfig(
        num_blocks=64,
        scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=chunk),
    )
    engine = DecodeEngine(loaded, config, b"sliding-window-test")
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    engine.add_request(EngineRequest("r", prompt, params))
    tokens = []
    while engine.has_unfinished():
        tokens += [out.token_id for out in engine.step()]
    return tokens


def test_the_windows_are_read_per_layer(models) -> None:
    name, _, ours = models
    assert ours.config.layer_windows == EXPECTED_WINDOWS[name]
    assert [layer.self_attn.window for layer in ours.model.layers] == [
        w or None for w in EXPECTED_WINDOWS[name]
    ]


@torch.inference_mode()
def test_last_position_logits_match(models) -> None:
    _name, reference, ours = models
    prompts = [_prompt(n, ours.config.vocab_size) for n in PROMPT_LENS]
    input_ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    hidden = ours.model(input_ids, positions, ContiguousKVAttention(PROMPT_LENS))
    logits = ours.model.compute_logits(hidden[torch.tensor(PROMPT_LENS).cumsum(0) - 1])
    for row, prompt in enumerate(prompts):
        expected = reference(torch.tensor([prompt])).logits[0, -1].float()
        torch.testing.assert_close(
            logits[row], expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item()
        )


@pytest.mark.parametrize("prompt_len", PROMPT_LENS)
def test_greedy_tokens_match_transformers_on_every_path(models, prompt_len) -> None:
    name, reference, ours = models
    prompt = _prompt(prompt_len, ours.config.vocab_size)
    expected = hf_greedy(reference, prompt, NUM_NEW_TOKENS)
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    case = f"{name}, prompt_len={prompt_len}"
    assert generate(ours, [prompt], params)[0].token_ids == expected, case
    assert engine_greedy(ours, prompt, params) == expected, case
    # 24-token chunks: chunk boundaries fall inside, at and past the window.
    assert chunked_engine_greedy(ours, prompt, chunk=24) == expected, case


@torch.inference_mode()
def test_the_window_changes_what_a_long_prompt_computes(models) -> None:
    # Guard against a window that is parsed but never applied: past the window the
    # logits of the same weights without it are far from transformers'.
    _name, reference, ours = models
    prompt = _prompt(300, ours.config.vocab_size)
    expected = reference(torch.tensor([prompt])).logits[0, -1].float()
    for layer in ours.model.layers:
        layer.self_attn.window = None
    try:
        hidden = ours.model(torch.tensor(prompt), torch.arange(300), ContiguousKVAttention([300]))
        logits = ours.model.compute_logits(hidden[-1:])[0]
    finally:
        for i, layer in enumerate(ours.model.layers):
            layer.self_attn.window = ours.config.window(i)
    assert (logits - expected).abs().max() > 1e-2


BASE = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "max_position_embeddings": 512,
}


@pytest.mark.parametrize(
    ("hf", "windows"),
    [
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 64}, (64,) * 4),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": None}, ()),
        # A window no context reaches past is no window.
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 512}, ()),
        # Qwen2 applies its window only with use_sliding_window ...
        ({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 64}, ()),
        # ... on the layers from max_window_layers up, or as layer_types says.
        (
            {
                "architectures": ["Qwen2ForCausalLM"],
                "use_sliding_window": True,
                "sliding_window": 64,
                "max_window_layers": 2,
            },
            (0, 0, 64, 64),
        ),
        (
            {
                "architectures": ["Qwen2ForCausalLM"],
                "use_sliding_window": True,
                "sliding_window": 64,
                "layer_types": ["sliding_attention", "full_attention"] * 2,
            },
            (64, 0, 64, 0),
        ),
    ],
)
def test_config_windows(hf, windows) -> None:
    assert ModelConfig.from_hf_dict({**BASE, **hf}).layer_windows == windows


@pytest.mark.parametrize(
    ("hf", "needle"),
    [
        (
            {"architectures": ["LlamaForCausalLM"], "sliding_window": 64},
            "unsupported sliding_window 64 for LlamaForCausalLM",
        ),
        ({"architectures": ["MistralForCausalLM"], "sliding_window": 0}, "must be > 0"),
        (
            {
                "architectures": ["Qwen2ForCausalLM"],
                "use_sliding_window": True,
                "sliding_window": 64,
                "layer_types": ["sliding_attention"],
            },
            "layer_types must list 4",
        ),
    ],
)
def test_bad_window_configs_are_refused_by_name(hf, needle) -> None:
    with pytest.raises(ModelLoadError, match=needle):
        ModelConfig.from_hf_dict({**BASE, **hf})
