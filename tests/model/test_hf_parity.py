"""Our forward pass and greedy generation against `transformers` on tiny checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from model.attention import ContiguousKVAttention
from model.generation import generate
from model.loader import load_model
from model.sampling_params import FinishReason, SamplingParams

KINDS = ["llama_gqa", "llama_mqa_llama3", "qwen2", "mistral"]
PROMPT_LENS = [1, 15, 16, 17, 100]
NUM_NEW_TOKENS = 32


def _prompt(prompt_len: int, vocab_size: int) -> list[int]:
    generator = torch.Generator().manual_seed(1000 + prompt_len)
    return torch.randint(0, vocab_size, (prompt_len,), generator=generator).tolist()


@pytest.fixture(scope="module", params=KINDS)
def models(request, hf_checkpoint):
    path = hf_checkpoint(request.param)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return request.param, reference, load_model(str(path))


@torch.inference_mode()
def test_last_position_logits_match(models) -> None:
    kind, reference, ours = models
    prompts = [_prompt(n, ours.config.vocab_size) for n in PROMPT_LENS]
    # All prompts in one flattened forward: also checks that sequences stay separate.
    input_ids = torch.tensor([t for p in prompts for t in p])
    positions = torch.cat([torch.arange(len(p)) for p in prompts])
    hidden = ours.model(input_ids, positions, ContiguousKVAttention(PROMPT_LENS))
    last_rows = torch.tensor(PROMPT_LENS).cumsum(0) - 1
    logits = ours.model.compute_logits(hidden[last_rows])
    assert logits.dtype == torch.float32
    for row, prompt in enumerate(prompts):
        expected = reference(torch.tensor([prompt])).logits[0, -1].float()
        case = f"{kind}, prompt_len={len(prompt)}"
        torch.testing.assert_close(
            logits[row],
            expected,
            rtol=1e-4,
            atol=1e-4 * expected.abs().max().item(),
            msg=lambda m, case=case: f"{case}: {m}",
        )


def test_greedy_tokens_match_transformers_generate(models) -> None:
    kind, reference, ours = models
    prompts = [_prompt(n, ours.config.vocab_size) for n in PROMPT_LENS]
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    results = generate(ours, prompts, params)
    for prompt, result in zip(prompts, results, strict=True):
        expected = reference.generate(
            torch.tensor([prompt]),
            do_sample=False,
            max_new_tokens=NUM_NEW_TOKENS,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert len(expected) == NUM_NEW_TOKENS
        assert result.token_ids == expected, f"{kind}, prompt_len={len(prompt)}"
        assert result.finish_reason is FinishReason.LENGTH


def test_sharded_checkpoint_loads_identically(hf_checkpoint) -> None:
    single = hf_checkpoint("llama_gqa")
    sharded = hf_checkpoint("llama_gqa", max_shard_size="40KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    assert not (single / "model.safetensors.index.json").exists()
    a = load_model(str(single)).model.state_dict()
    b = load_model(str(sharded)).model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
