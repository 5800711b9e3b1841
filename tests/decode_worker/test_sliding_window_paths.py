"""Windowed models through the disaggregated flows without sockets: a prefill engine
computing in chunks that straddle the window, the memory store, and the decode flow
give `transformers`' greedy tokens, for prompts below, at and well past the window,
and with a prefix that comes from the store."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from decode_worker.engine import DecodeEngine, EngineRequest
from decode_worker.engine_config import EngineConfig
from decode_worker.scheduler import SchedulerConfig
from kvstore.hashing import hash_token_blocks
from model.loader import load_model
from model.sampling_params import SamplingParams
from tests.decode_worker.disaggregated import Disaggregated
from tests.model.greedy import hf_greedy

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


def test_disaggregated_flows_give_transformers_tokens(models) -> None:
    reference, ours = models
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    prompts = [prompt_of(n, ours.config.vocab_size) for n in PROMPT_LENS]
    # Shares the 300-token prompt's first 288 tokens (18 blocks) through the store.
    prompts.append([*prompts[-1][:288], *prompt_of(40, ours.config.vocab_size, seed=1)])
    with Disaggregated(ours, token_budget=24) as cluster:
        for i, prompt in enumerate(prompts):
            assert cluster.generate(f"r{i}", prompt, params) == hf_greedy(
                reference, prompt, NUM_NEW_TOKENS
            ), f"prompt {i} ({len(prompt)} tokens)"
        assert cluster.prefill_engine.counters.num_cached_tokens_total >= 288


def test_a_window_only_model_holds_at_most_the_window_in_the_pool(hf_checkpoint) -> None:
    # Mistral, window 32 on every layer, blocks of 16: each sequence holds at most
    # ceil(32 / 16) + 1 = 3 blocks while it generates 200 tokens past the window,
    # and its tokens stay transformers'.
    path = hf_checkpoint("mistral", sliding_window=32)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(str(path))
    prompts = [prompt_of(40, ours.config.vocab_size, seed=s) for s in (7, 8)]
    num_new = 232 - 40 + 32  # past the window by 200 and more
    config = EngineConfig(num_blocks=64, scheduler=SchedulerConfig(max_num_seqs=2))
    engine = DecodeEngine(ours, config, b"window-pool-test")
    params = SamplingParams(max_tokens=num_new, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), prompt, params))
    tokens: list[list[int]] = [[], []]
    most_used = 0
    while engine.has_unfinished():
        for out in engine.step():
            tokens[int(out.request_id)].append(out.token_id)
        most_used = max(most_used, engine.pool.num_used_blocks)
    assert most_used <= 2 * 3
    for prompt, got in zip(prompts, tokens, strict=True):
        expected = hf_greedy(reference, prompt, num_new)
        assert got == expected
    engine.pool.check_integrity()
    assert engine.pool.num_used_blocks == 0


def test_a_window_only_model_moves_only_the_window_through_the_store(hf_checkpoint) -> None:
    # Mistral, window 32, blocks of 16, a 300-token prompt: decode's first token (at
    # position 300) sees positions 269.., so only blocks 16 and 17 of 18 (and the
    # tail) are published and fetched; the rest are computed, used and dropped.
    path = hf_checkpoint("mistral", sliding_window=32)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = load_model(str(path))
    prompt = prompt_of(300, ours.config.vocab_size, seed=5)
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    with Disaggregated(ours, token_budget=64) as cluster:
        assert cluster.generate("a", prompt, params) == hf_greedy(reference, prompt, NUM_NEW_TOKENS)
        spec = cluster.store.spec
        hashes = hash_token_blocks(prompt, spec.block_size, spec.fingerprint)
        assert len(hashes) == 18
        assert cluster.store.lookup(hashes[:16]) == 0
        assert cluster.store.lookup(hashes[16:]) == 2
        # A longer prompt sharing the first 288 tokens needs blocks 16 and 17 for its
        # 289th token's window: it reuses them although blocks 0..15 were never stored.
        longer = [*prompt[:288], *prompt_of(30, ours.config.vocab_size, seed=6)]
        assert cluster.generate("b", longer, params) == hf_greedy(reference, longer, NUM_NEW_TOKENS)
        assert cluster.prefill_engine.counters.num_cached_tokens_total == 288
