"""Windowed models through the disaggregated flows without sockets: a prefill engine
computing in chunks that straddle the window, the memory store, and the decode flow
give `transformers`' greedy tokens, for prompts below, at and well past the window,
and with a prefix that comes from the store."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from model.loader import load_model
from model.sampling_params import SamplingParams
from tests.decode_worker.disaggregated import Disaggregated

CHECKPOINTS = {
    "mistral-window-32": ("mistral", {"sliding_window": 32}),
    "gemma3-window-16": ("gemma3", {}),
}
PROMPT_LENS = [5, 16, 17, 100, 300]
NUM_NEW_TOKENS = 24


@pytest.fixture(scope="module", params=sorted(CHECKPOINTS))
def models(request, hf_checkpoint):
    kind, overrides = CHECKPOINTS[request.param]
    path = hf_checkpoint(kind, **overrides)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return reference, load_model(str(path))


def prompt_of(n: int, vocab_size: int, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(3000 + n + seed)
    return torch.randint(3, vocab_size, (n,), generator=generator).tolist()


def hf_greedy(reference, prompt: list[int]) -> list[int]:
    out = reference.generate(
        torch.tensor([prompt]),
        do_sample=False,
        max_new_tokens=NUM_NEW_TOKENS,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def test_disaggregated_flows_give_transformers_tokens(models) -> None:
    reference, ours = models
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    prompts = [prompt_of(n, ours.config.vocab_size) for n in PROMPT_LENS]
    # Shares the 300-token prompt's first 288 tokens (18 blocks) through the store.
    prompts.append([*prompts[-1][:288], *prompt_of(40, ours.config.vocab_size, seed=1)])
    with Disaggregated(ours, token_budget=24) as cluster:
        for i, prompt in enumerate(prompts):
            assert cluster.generate(f"r{i}", prompt, params) == hf_greedy(reference, prompt), (
                f"prompt {i} ({len(prompt)} tokens)"
            )
        assert cluster.prefill_engine.counters.num_cached_tokens_total >= 288
