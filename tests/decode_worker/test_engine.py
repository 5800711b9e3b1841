"""The decode engine against `transformers`: continuous batching, preemption,
requests arriving mid-run, and K/V handed in from outside must all give exactly the
tokens each prompt gives alone."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from decode_worker.engine import DecodeEngine, EngineRequest, StepFailed
from decode_worker.engine_config import EngineConfig
from decode_worker.scheduler import RequestTooLargeError, SchedulerConfig
from kvstore.hashing import hash_token_blocks
from model.attention import ContiguousKVAttention
from model.loader import load_model
from model.sampling_params import FinishReason, SamplingParams

FINGERPRINT = b"f" * 16
BLOCK_SIZE = 8
NUM_NEW_TOKENS = 12


@pytest.fixture(scope="module")
def models(hf_checkpoint):
    path = hf_checkpoint("llama_gqa")
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return reference, load_model(str(path))


def prompts(vocab_size: int) -> list[list[int]]:
    generator = torch.Generator().manual_seed(7)
    lengths = [1, 5, 7, 8, 9, 15, 16, 17, 23, 31, 33, 40, 47, 55, 64, 70]
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


@torch.inference_mode()
def reference_tokens(reference, prompt: list[int]) -> list[int]:
    out = reference.generate(
        torch.tensor([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=NUM_NEW_TOKENS,
        min_new_tokens=NUM_NEW_TOKENS,
        do_sample=False,
    )
    return out[0, len(prompt) :].tolist()


def run_to_completion(engine: DecodeEngine, arrivals: dict[int, list[EngineRequest]]):
    tokens: dict[str, list[int]] = {}
    finish: dict[str, FinishReason] = {}
    step = 0
    while engine.has_unfinished() or any(k >= step for k in arrivals):
        for request in arrivals.pop(step, []):
            engine.add_request(request)
        for out in engine.step():
            tokens.setdefault(out.request_id, []).append(out.token_id)
            if out.finish_reason is not None:
                finish[out.request_id] = out.finish_reason
        step += 1
        assert step < 5000, "engine did not finish"
    return tokens, finish


def test_sixteen_prompts_with_preemption_and_late_arrivals_match_transformers(models):
    reference, loaded = models
    ps = prompts(loaded.config.vocab_size)
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    # 40 blocks of 8 tokens hold the largest request alone (82 tokens) but far from all
    # sixteen (about 660 tokens), so the scheduler must preempt and recompute.
    engine = DecodeEngine(
        loaded,
        EngineConfig(
            num_blocks=40,
            block_size=BLOCK_SIZE,
            scheduler=SchedulerConfig(max_num_batched_tokens=64),
        ),
        FINGERPRINT,
    )
    arrivals: dict[int, list[EngineRequest]] = {}
    for i, prompt in enumerate(ps):
        arrivals.setdefault((i % 4) * 3, []).append(EngineRequest(f"r{i}", prompt, params))
    tokens, finish = run_to_completion(engine, arrivals)
    assert engine.counters.num_preemptions_total > 0, "the pool was meant to force preemption"
    for i, prompt in enumerate(ps):
        assert tokens[f"r{i}"] == reference_tokens(reference, prompt), (
            f"prompt {i} (len {len(prompt)})"
        )
        assert finish[f"r{i}"] is FinishReason.LENGTH
    engine.pool.check_integrity()
    assert engine.pool.num_free_blocks == engine.pool.num_blocks


@torch.inference_mode()
def test_provided_kv_and_first_token_continue_exactly(models):
    """A request whose prompt K/V and first token come from elsewhere (a prefill
    worker) continues as if the engine had computed them."""
    reference, loaded = models
    prompt = prompts(loaded.config.vocab_size)[11]  # 40 tokens: 5 full blocks
    attention = ContiguousKVAttention([len(prompt)])
    hidden = loaded.model(torch.tensor(prompt), torch.arange(len(prompt)), attention)
    first = int(loaded.model.compute_logits(hidden[-1:]).argmax())
    kv = attention.new_kv(0)
    blocks = [kv[:, :, i : i + BLOCK_SIZE].contiguous() for i in range(0, len(prompt), BLOCK_SIZE)]
    engine = DecodeEngine(loaded, EngineConfig(num_blocks=64, block_size=BLOCK_SIZE), FINGERPRINT)
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    engine.add_request(
        EngineRequest("a", prompt, params, output_token_ids=(first,), provided_kv=blocks)
    )
    tokens, _ = run_to_completion(engine, {})
    expected = reference_tokens(reference, prompt)
    assert [first, *tokens["a"]] == expected
    assert engine.counters.num_computed_tokens_total == NUM_NEW_TOKENS - 1
    # The prompt's blocks stay resident under the store's hash chain.
    hashes = hash_token_blocks(prompt, BLOCK_SIZE, FINGERPRINT)
    assert engine.pool.lookup_prefix(hashes) == len(hashes)

    # A second request with the same prompt reuses the resident blocks; only the
    # blocks after provided_start_block are handed in.
    engine.add_request(
        EngineRequest(
            "b",
            prompt,
            params,
            output_token_ids=(first,),
            provided_kv=blocks[3:],
            provided_start_block=3,
        )
    )
    tokens, _ = run_to_completion(engine, {})
    assert [first, *tokens["b"]] == expected
    engine.pool.check_integrity()


def test_abort_frees_every_block(models):
    _, loaded = models
    engine = DecodeEngine(loaded, EngineConfig(num_blocks=32, block_size=BLOCK_SIZE), FINGERPRINT)
    params = SamplingParams(max_tokens=50, ignore_eos=True)
    engine.add_request(EngineRequest("x", list(range(3, 40)), params))
    engine.add_request(EngineRequest("y", list(range(3, 20)), params))
    engine.step()
    engine.step()
    assert engine.abort("x") and engine.abort("y")
    assert not engine.has_unfinished()
    engine.pool.check_integrity()
    assert engine.pool.num_free_blocks == 32


def test_request_too_large_for_the_pool_is_refused(models):
    _, loaded = models
    engine = DecodeEngine(loaded, EngineConfig(num_blocks=4, block_size=BLOCK_SIZE), FINGERPRINT)
    with pytest.raises(RequestTooLargeError, match="lower max_new_tokens or shorten the prompt"):
        engine.add_request(EngineRequest("big", list(range(3, 40)), SamplingParams(max_tokens=8)))
    assert not engine.has_unfinished()


def test_a_step_that_raises_fails_only_its_requests_and_the_engine_goes_on(models):
    reference, loaded = models
    engine = DecodeEngine(
        loaded,
        EngineConfig(
            num_blocks=32, block_size=BLOCK_SIZE, scheduler=SchedulerConfig(max_num_seqs=1)
        ),
        FINGERPRINT,
    )
    run = engine.runner.run

    def run_failing_for_doomed(step):
        if any(s.request_id == "doomed" for s in (*step.decodes, *step.prefills)):
            raise RuntimeError("kernel fault")
        return run(step)

    engine.runner.run = run_failing_for_doomed
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    survivor = prompts(loaded.config.vocab_size)[6]
    engine.add_request(EngineRequest("doomed", list(range(3, 30)), params))
    engine.add_request(EngineRequest("survivor", survivor, params))  # waits: 1 seq at most
    with pytest.raises(StepFailed, match="kernel fault") as err:
        engine.step()
    assert err.value.request_ids == ("doomed",)
    tokens, _ = run_to_completion(engine, {})
    assert tokens == {"survivor": reference_tokens(reference, survivor)}
    engine.pool.check_integrity()
    assert engine.pool.num_used_blocks == 0


def test_provided_kv_of_the_wrong_shape_is_refused_when_added(models):
    _, loaded = models
    engine = DecodeEngine(loaded, EngineConfig(num_blocks=32, block_size=BLOCK_SIZE), FINGERPRINT)
    config = loaded.config
    wrong = torch.zeros(config.num_layers, 2, BLOCK_SIZE, config.num_kv_heads + 1, config.head_dim)
    with pytest.raises(ValueError, match="provided K/V block 0 has shape"):
        engine.add_request(
            EngineRequest(
                "bad", list(range(3, 20)), SamplingParams(max_tokens=2), provided_kv=[wrong]
            )
        )
    assert not engine.has_unfinished()
