from __future__ import annotations

import pytest
import torch

from model.generation import generate
from model.loader import load_model
from model.sampling import filtered_probs, sample
from model.sampling_params import (
    FinishReason,
    SamplingParams,
    final_finish_reason,
    finish_reason,
    stop_token_set,
)


@pytest.fixture(scope="module")
def tiny():
    return load_model("dummy:tiny")


def _logits(batch: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_sampling_params_validation() -> None:
    for bad in (
        {"max_tokens": 0},
        {"temperature": -0.1},
        {"temperature": float("nan")},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"top_k": -1},
        {"stop": ("",)},
        {"stop_token_ids": (-1,)},
    ):
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    assert SamplingParams(stop=["a"], stop_token_ids=[3]).stop == ("a",)


def test_greedy_and_top_k_1_are_argmax() -> None:
    logits = _logits(4)
    expected = logits.argmax(-1).tolist()
    greedy, _ = sample(logits, [SamplingParams()] * 4, [0] * 4)
    top1, _ = sample(logits, [SamplingParams(temperature=1.5, top_k=1, seed=3)] * 4, [0, 1, 2, 3])
    assert greedy == expected == top1


def test_seeded_draw_depends_only_on_seed_index_and_row() -> None:
    logits = _logits(6)
    seeded = SamplingParams(temperature=1.0, seed=42)
    alone = [sample(logits[i : i + 1], [seeded], [i])[0][0] for i in range(6)]
    # Same rows in one batch, mixed with greedy and unseeded rows and in reverse order.
    mixed_params = [seeded, SamplingParams(), seeded, SamplingParams(temperature=1.0)] * 2
    batch = torch.cat([logits[5:6], logits[0:1], logits[3:4], logits[1:2]])
    tokens, _ = sample(batch, mixed_params[:4], [5, 0, 3, 0])
    assert tokens[0] == alone[5] and tokens[2] == alone[3]
    assert sample(logits, [seeded] * 6, list(range(6)))[0] == alone  # and across runs
    assert alone != [alone[0]] * 6  # the index really changes the draw


def test_temperature_sampling_matches_softmax_distribution() -> None:
    # 8000 seeded draws (seeds 0..7999) from a 5-token vocabulary at temperature 0.7;
    # Pearson chi-square with 4 degrees of freedom must stay below 18.47 (p = 0.001).
    # Seeds are fixed, so the statistic is the same on every run.
    logits = torch.tensor([1.0, 0.5, 0.0, -0.5, -2.0])
    num_draws = 8000
    params = [SamplingParams(temperature=0.7, seed=s) for s in range(num_draws)]
    tokens, _ = sample(logits.expand(num_draws, 5).clone(), params, [0] * num_draws)
    counts = torch.bincount(torch.tensor(tokens), minlength=5).double()
    expected = torch.softmax(logits / 0.7, dim=-1).double() * num_draws
    chi_square = ((counts - expected) ** 2 / expected).sum().item()
    assert chi_square < 18.47, (counts.tolist(), expected.tolist())


def test_top_k_and_top_p_filtering() -> None:
    logits = torch.log(torch.tensor([0.1, 0.4, 0.2, 0.3]))
    top2 = filtered_probs(logits, SamplingParams(temperature=1.0, top_k=2))
    torch.testing.assert_close(top2, torch.tensor([0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7]))
    # Mass above each token (sorted): 0, 0.4, 0.7, 0.9 -> top_p=0.6 keeps 0.4 and 0.3.
    nucleus = filtered_probs(logits, SamplingParams(temperature=1.0, top_p=0.6))
    torch.testing.assert_close(nucleus, torch.tensor([0.0, 0.4 / 0.7, 0.0, 0.3 / 0.7]))
    tokens, _ = sample(
        logits.expand(200, 4),
        [SamplingParams(temperature=1.0, top_p=0.6, seed=s) for s in range(200)],
        [0] * 200,
    )
    assert set(tokens) == {1, 3}


def test_logprobs_are_raw_log_softmax() -> None:
    logits = _logits(2)
    params = [SamplingParams(logprobs=True), SamplingParams(temperature=2.0, seed=1, logprobs=True)]
    tokens, logprobs = sample(logits, params, [0, 0])
    expected = torch.log_softmax(logits, -1)[torch.arange(2), torch.tensor(tokens)]
    torch.testing.assert_close(torch.tensor(logprobs), expected)


def test_finish_reason() -> None:
    params = SamplingParams(max_tokens=3, stop_token_ids=(9,))
    stops = stop_token_set(params, (7,))
    assert stops == {7, 9}
    assert finish_reason(5, 1, stops, 3) is None
    assert finish_reason(9, 1, stops, 3) is FinishReason.STOP
    assert finish_reason(7, 1, stops, 3) is FinishReason.STOP
    assert finish_reason(5, 3, stops, 3) is FinishReason.LENGTH
    assert finish_reason(9, 3, stops, 3) is FinishReason.STOP  # a stop token wins over length
    ignoring = SamplingParams(max_tokens=3, ignore_eos=True, stop_token_ids=(9,))
    assert stop_token_set(ignoring, (7,)) == {9}


def test_a_stop_string_match_wins_over_length() -> None:
    assert final_finish_reason(FinishReason.LENGTH, True) is FinishReason.STOP
    assert final_finish_reason(None, True) is FinishReason.STOP
    assert final_finish_reason(FinishReason.LENGTH, False) is FinishReason.LENGTH
    assert final_finish_reason(None, False) is None


@pytest.mark.parametrize("temperature", [1e-38, 1e-20, 9.9e-6])
def test_a_tiny_temperature_is_greedy(temperature: float) -> None:
    # 1e-38 once overflowed the softmax and returned the last vocabulary id.
    logits = _logits(3)
    params = SamplingParams(temperature=temperature, seed=3)
    assert params.is_greedy
    tokens, _ = sample(logits, [params] * 3, [0, 1, 2])
    assert tokens == logits.argmax(-1).tolist()
    assert not SamplingParams(temperature=1e-5).is_greedy


def test_seeded_generation_is_independent_of_the_batch(tiny) -> None:
    prompt = tiny.tokenizer.encode("kvrelay")
    seeded = SamplingParams(max_tokens=12, temperature=1.0, seed=7, ignore_eos=True)
    alone = generate(tiny, [prompt], seeded)[0].token_ids
    others = [tiny.tokenizer.encode("a much longer prompt than the other one"), [3]]
    batch = generate(
        tiny,
        [others[0], prompt, others[1]],
        [SamplingParams(max_tokens=5), seeded, SamplingParams(max_tokens=20, temperature=0.5)],
    )
    assert batch[1].token_ids == alone
    assert generate(tiny, [prompt], seeded)[0].token_ids == alone
    greedy = generate(tiny, [prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    assert alone != greedy


def test_generation_stops_on_stop_token_and_max_tokens(tiny) -> None:
    prompt = tiny.tokenizer.encode("Hello from kvrelay")
    full = generate(tiny, [prompt], SamplingParams(max_tokens=10, ignore_eos=True))[0]
    assert full.token_ids == [35, 23, 13, 199, 94, 235, 128, 244, 159, 244]
    assert full.finish_reason is FinishReason.LENGTH
    stopped = generate(tiny, [prompt], SamplingParams(max_tokens=10, stop_token_ids=(199,)))[0]
    assert stopped.token_ids == [35, 23, 13, 199]
    assert stopped.finish_reason is FinishReason.STOP
