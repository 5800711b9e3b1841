"""The OpenAI API's edges without sockets: pydantic bodies into GenerateRequests
(the one request path both APIs share), and the router's refusals into OpenAI's
error statuses and bodies."""

from __future__ import annotations

import grpc
import pytest

from router.http_api import ApiError
from router.openai_models import ChatCompletionRequest, CompletionRequest, UnsupportedField
from router.relay_error import RelayError
from router.validation import InvalidRequest


def test_a_completion_body_becomes_a_generate_request():
    body = CompletionRequest(
        model="m", prompt="hi", max_tokens=5, top_p=0.5, top_k=-1, seed=7, stop="x", logprobs=0
    )
    request = body.to_generate_request("cmpl-1")
    assert request.request_id == "cmpl-1" and request.prompt == "hi"
    sampling = request.sampling
    assert (sampling.max_tokens, sampling.top_p, sampling.top_k, sampling.seed) == (5, 0.5, 0, 7)
    assert list(sampling.stop) == ["x"] and sampling.logprobs
    assert sampling.temperature == 1.0  # OpenAI's default, not the gRPC API's greedy


def test_unset_fields_stay_unset_so_the_router_defaults_apply():
    sampling = CompletionRequest(model="m", prompt=[1, 2]).to_generate_request("r").sampling
    assert not sampling.HasField("max_tokens") and not sampling.HasField("seed")
    assert not sampling.HasField("top_p") and not sampling.logprobs


def test_a_chat_body_becomes_messages_and_max_completion_tokens_wins():
    body = ChatCompletionRequest(
        model="m",
        messages=[
            {"role": "system", "content": "s"},
            {
                "role": "user",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
            },
            {"role": "assistant", "content": None},
        ],
        max_tokens=9,
        max_completion_tokens=3,
        stop=["p", "q"],
        temperature=0,
    )
    request = body.to_generate_request("chatcmpl-1")
    assert [(m.role, m.content) for m in request.messages] == [
        ("system", "s"),
        ("user", "ab"),
        ("assistant", ""),
    ]
    assert request.add_generation_prompt is True and request.HasField("add_generation_prompt")
    assert request.sampling.max_tokens == 3 and list(request.sampling.stop) == ["p", "q"]


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (CompletionRequest(model="m", prompt="x", n=2), "n"),
        (CompletionRequest(model="m", prompt="x", echo=True), "echo"),
        (CompletionRequest(model="m", prompt="x", presence_penalty=0.5), "presence_penalty"),
        (
            CompletionRequest(model="m", prompt="x", stream_options={"include_usage": True}),
            "stream_options",
        ),
        (
            ChatCompletionRequest(model="m", messages=[{"role": "user"}], top_logprobs=2),
            "top_logprobs",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_what_is_not_served_is_refused_by_name(body, param):
    with pytest.raises(UnsupportedField) as err:
        body.check_supported()
    assert err.value.param == param


@pytest.mark.parametrize(
    ("code", "status", "type_"),
    [
        (grpc.StatusCode.RESOURCE_EXHAUSTED, 429, "rate_limit_error"),
        (grpc.StatusCode.UNAVAILABLE, 503, "service_unavailable_error"),
        (grpc.StatusCode.DEADLINE_EXCEEDED, 504, "timeout_error"),
        (grpc.StatusCode.NOT_FOUND, 404, "invalid_request_error"),
        (grpc.StatusCode.INTERNAL, 500, "server_error"),
    ],
)
def test_relay_statuses_map_to_http_statuses(code, status, type_):
    err = ApiError.of(RelayError(code, "why"))
    assert err.status == status
    assert err.body.model_dump() == {
        "error": {"message": "why", "type": type_, "param": None, "code": code.name.lower()}
    }


@pytest.mark.parametrize(
    "body",
    [
        CompletionRequest(model="m", prompt="hi", cache_salt="tenant-a"),
        CompletionRequest(model="m", prompt=[1, 2], cache_salt="tenant-a"),
        ChatCompletionRequest(
            model="m", messages=[{"role": "user", "content": "hi"}], cache_salt="tenant-a"
        ),
    ],
    ids=["text", "token-ids", "chat"],
)
def test_the_cache_salt_is_passed_through(body):
    assert body.to_generate_request("r").cache_salt == "tenant-a"
    unsalted = body.model_copy(update={"cache_salt": None})
    assert not unsalted.to_generate_request("r").HasField("cache_salt")


@pytest.mark.parametrize(
    ("message", "param", "shown"),
    [
        ("sampling.max_tokens must be at least 1, got 0", "max_tokens", "max_tokens must be"),
        ("cache_salt is 300 bytes; the limit is 256; send a shorter salt", "cache_salt", "cache_"),
        ("sampling.stop[1] is 300 bytes; the limit is 256", "stop", "stop[1] is 300"),
        ("prompt_token_ids[2] is 999; token ids must be in [0, 259)", "prompt", "prompt_token_ids"),
        ("messages: the chat template refused these messages: no", "messages", "messages:"),
        ("request is 2000000 bytes; the limit is 1048576", None, "request is"),
    ],
)
def test_invalid_requests_are_400s_naming_the_openai_field(message, param, shown):
    err = ApiError.of(InvalidRequest(message))
    assert err.status == 400 and err.body.error.param == param
    assert err.body.error.message.startswith(shown)
