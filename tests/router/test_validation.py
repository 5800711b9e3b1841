import math

import pytest

from model.prompt_limits import InvalidPrompt, check_prompt
from protos import generator_pb2 as pb
from router.validation import (
    InvalidRequest,
    RequestLimits,
    validate_prompt_shape,
    validate_sampling,
)

LIMITS = RequestLimits(
    max_tokens=100, max_stop_token_ids=4, max_request_bytes=10_000, max_prompt_bytes=5_000
)
MODEL = {"vocab_size": 300, "max_context_len": 64}


def test_defaults_are_filled():
    sampling = validate_sampling(pb.SamplingParams(), LIMITS)
    assert sampling.max_tokens == 16
    assert sampling.top_p == 1.0
    assert sampling.temperature == 0.0
    assert sampling.top_k == 0
    assert sampling.seed is None


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (pb.SamplingParams(max_tokens=0), "sampling.max_tokens must be at least 1"),
        (
            pb.SamplingParams(max_tokens=101),
            "sampling.max_tokens is 101; this server allows at most 100",
        ),
        (pb.SamplingParams(temperature=-0.5), "sampling.temperature must be a finite number >= 0"),
        (
            pb.SamplingParams(temperature=math.inf),
            "sampling.temperature must be a finite number >= 0",
        ),
        (
            pb.SamplingParams(temperature=math.nan),
            "sampling.temperature must be a finite number >= 0",
        ),
        (pb.SamplingParams(top_p=0.0), "sampling.top_p must be in (0, 1], got 0.0"),
        (pb.SamplingParams(top_p=1.5), "sampling.top_p must be in (0, 1], got 1.5"),
        (pb.SamplingParams(top_p=math.nan), "sampling.top_p must be in (0, 1]"),
        (pb.SamplingParams(top_k=-1), "sampling.top_k must be >= 0"),
        (pb.SamplingParams(stop=["x"] * 17), "sampling.stop has 17 strings; at most 16"),
        (
            pb.SamplingParams(stop=["a", "é" * 129]),
            "sampling.stop[1] is 258 bytes; the limit is 256",
        ),
        (pb.SamplingParams(stop=[""]), "sampling.stop[0] is empty"),
        (
            pb.SamplingParams(stop_token_ids=[1, 2, 3, 4, 5]),
            "sampling.stop_token_ids has 5 ids; at most 4 are allowed",
        ),
    ],
    ids=lambda v: "" if isinstance(v, str) else str(v).replace("\n", " ").strip(),
)
def test_sampling_refusals_name_the_field(params, message):
    with pytest.raises(InvalidRequest) as err:
        validate_sampling(params, LIMITS)
    assert str(err.value).startswith(message), str(err.value)


def test_valid_edges_pass():
    params = pb.SamplingParams(
        max_tokens=100, top_p=1.0, top_k=0, stop=["x"] * 16, stop_token_ids=[1, 2, 3, 4]
    )
    assert validate_sampling(params, LIMITS).max_tokens == 100
    validate_prompt_shape(pb.GenerateRequest(prompt="é" * 2_500), LIMITS)  # 5,000 bytes


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (pb.GenerateRequest(), "prompt is empty"),
        (
            pb.GenerateRequest(prompt="hi", prompt_token_ids=[1]),
            "set only one of prompt, prompt_token_ids and messages, not prompt and prompt_token_ids",
        ),
        (
            pb.GenerateRequest(prompt="hi", messages=[pb.ChatMessage(role="user", content="x")]),
            "set only one of prompt, prompt_token_ids and messages, not prompt and messages",
        ),
        (
            pb.GenerateRequest(
                prompt_token_ids=[1], messages=[pb.ChatMessage(role="user", content="x")]
            ),
            "set only one of prompt, prompt_token_ids and messages, not prompt_token_ids and messages",
        ),
        (
            pb.GenerateRequest(
                prompt="a", prompt_token_ids=[1], messages=[pb.ChatMessage(role="user")]
            ),
            "set only one of prompt, prompt_token_ids and messages, not prompt and "
            "prompt_token_ids and messages",
        ),
        (pb.GenerateRequest(prompt="x" * 20_000), "request is 2000"),
        (
            pb.GenerateRequest(prompt="é" * 2_501),
            "prompt is 5002 bytes of text; the limit is 5000 (checked before tokenizing)",
        ),
        (
            pb.GenerateRequest(
                messages=[
                    pb.ChatMessage(role="system", content="x" * 2_500),
                    pb.ChatMessage(role="user", content="y" * 2_500),
                ]
            ),
            "messages hold 5010 bytes of text; the limit is 5000",
        ),
        (
            pb.GenerateRequest(prompt="hi", add_generation_prompt=False),
            "add_generation_prompt applies to messages only",
        ),
        (
            pb.GenerateRequest(messages=[pb.ChatMessage(role="user"), pb.ChatMessage(content="x")]),
            "messages[1].role is empty",
        ),
    ],
    ids=[
        "neither",
        "prompt-and-ids",
        "prompt-and-messages",
        "ids-and-messages",
        "all-three",
        "too-big",
        "prompt-text-too-long",
        "messages-text-too-long",
        "add-generation-prompt-without-messages",
        "no-role",
    ],
)
def test_prompt_shape_refusals(request_, message):
    with pytest.raises(InvalidRequest) as err:
        validate_prompt_shape(request_, LIMITS)
    assert str(err.value).startswith(message), str(err.value)


def test_token_ids_must_be_in_vocab():
    with pytest.raises(
        InvalidPrompt,
        match=r"prompt_token_ids\[2\] is 300; token ids must be in \[0, 300\)",
    ):
        check_prompt([1, 2, 300], 4, **MODEL)


def test_context_overflow_names_both_numbers():
    check_prompt([1] * 60, 4, **MODEL, field="prompt")  # exactly fits
    with pytest.raises(
        InvalidPrompt,
        match=r"prompt has 60 tokens and sampling.max_tokens is 5: together over the model's context of 64",
    ):
        check_prompt([1] * 60, 5, **MODEL, field="prompt")


def test_an_empty_prompt_is_refused():
    with pytest.raises(InvalidPrompt, match="prompt encodes to no tokens"):
        check_prompt([], 4, **MODEL, field="prompt")
