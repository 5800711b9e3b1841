"""A DecodeRequest becomes a DecodeCall at the servicer's edge: what the caller
sends is checked there (sampling, the cache salt, prefill and resumed tokens not
both), and what a prefill handed on becomes the call's one output token."""

from __future__ import annotations

import pytest

from decode_worker.admission import PrefillHandoff
from decode_worker.service import call_from_proto
from protos import generator_pb2 as pb
from protos import workers_pb2 as wpb

PROMPT = list(range(10, 20))


def test_a_prefilled_request_continues_after_the_prefill_workers_token() -> None:
    call = call_from_proto(
        wpb.DecodeRequest(
            request_id="r.d1",
            prompt_token_ids=PROMPT,
            prefill=wpb.PrefillResult(first_token_id=7, has_tail=True, tail_id="r.p1"),
            cache_salt="tenant-a",
        )
    )
    assert (list(call.generated_token_ids), call.prefill) == ([7], PrefillHandoff("r.p1"))
    assert call.cache_salt == "tenant-a" and not call.is_resumed


def test_a_resumed_request_keeps_its_tokens_and_has_no_salt_unless_sent() -> None:
    call = call_from_proto(
        wpb.DecodeRequest(request_id="r.d2", prompt_token_ids=PROMPT, generated_token_ids=[7, 8])
    )
    assert list(call.generated_token_ids) == [7, 8] and call.is_resumed
    assert call.cache_salt is None


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (
            wpb.DecodeRequest(
                prompt_token_ids=PROMPT,
                prefill=wpb.PrefillResult(first_token_id=7),
                generated_token_ids=[7, 8],
            ),
            "generated_token_ids must be empty with prefill",
        ),
        (wpb.DecodeRequest(prompt_token_ids=PROMPT, cache_salt=""), "cache_salt is empty"),
        (wpb.DecodeRequest(prompt_token_ids=PROMPT, cache_salt="x" * 257), "cache_salt is 257"),
        (
            wpb.DecodeRequest(prompt_token_ids=PROMPT, sampling=pb.SamplingParams(top_p=2.0)),
            "sampling.top_p must be in (0, 1]",
        ),
    ],
    ids=["prefill-and-generated", "empty-salt", "long-salt", "sampling"],
)
def test_what_a_caller_may_not_send_is_refused_naming_the_field(request_, message) -> None:
    with pytest.raises(ValueError) as err:
        call_from_proto(request_)
    assert str(err.value).startswith(message), str(err.value)
