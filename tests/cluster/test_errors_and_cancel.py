"""Bad requests get INVALID_ARGUMENT with a message naming the field, and cancelled
requests — wherever they are — leave no block, queue entry or tail behind."""

from __future__ import annotations

import math
import threading
import time

import grpc
import pytest

from protos import generator_pb2 as pb

pytestmark = pytest.mark.slow

VOCAB_SIZE = 320
CONTEXT_LEN = 512

INVALID = [
    ("empty", {}, "prompt is empty"),
    (
        "both",
        {"prompt": "hi", "prompt_token_ids": [5]},
        "set only one of prompt, prompt_token_ids and messages, not prompt and prompt_token_ids",
    ),
    ("token-id-too-large", {"prompt_token_ids": [5, VOCAB_SIZE]}, "prompt_token_ids[1] is 320"),
    (
        "over-context",
        {"prompt_token_ids": [5] * 500, "sampling": pb.SamplingParams(max_tokens=13)},
        "over the model's context of 512 tokens",
    ),
    (
        "max-tokens-zero",
        {"prompt": "hi", "sampling": pb.SamplingParams(max_tokens=0)},
        "sampling.max_tokens",
    ),
    (
        "max-tokens-over-limit",
        {"prompt": "hi", "sampling": pb.SamplingParams(max_tokens=100_000)},
        "sampling.max_tokens is 100000",
    ),
    (
        "temperature-negative",
        {"prompt": "hi", "sampling": pb.SamplingParams(temperature=-1)},
        "sampling.temperature",
    ),
    (
        "temperature-nan",
        {"prompt": "hi", "sampling": pb.SamplingParams(temperature=math.nan)},
        "sampling.temperature",
    ),
    ("top-p-zero", {"prompt": "hi", "sampling": pb.SamplingParams(top_p=0.0)}, "sampling.top_p"),
    (
        "top-p-over-one",
        {"prompt": "hi", "sampling": pb.SamplingParams(top_p=1.5)},
        "sampling.top_p",
    ),
    ("top-k-negative", {"prompt": "hi", "sampling": pb.SamplingParams(top_k=-3)}, "sampling.top_k"),
    (
        "too-many-stops",
        {"prompt": "hi", "sampling": pb.SamplingParams(stop=["x"] * 17)},
        "sampling.stop has 17",
    ),
    (
        "stop-too-long",
        {"prompt": "hi", "sampling": pb.SamplingParams(stop=["y" * 257])},
        "sampling.stop[0] is 257 bytes",
    ),
    ("request-too-big", {"prompt": "z" * (1024 * 1024 + 10)}, "request is"),
]


@pytest.mark.parametrize(
    ("fields", "message"), [c[1:] for c in INVALID], ids=[c[0] for c in INVALID]
)
def test_invalid_requests_are_refused_with_a_message_naming_the_field(cluster, fields, message):
    with pytest.raises(grpc.RpcError) as err:
        cluster.generate(**fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in err.value.details()


def test_cluster_serves_normally_after_bad_requests(cluster):
    responses = cluster.generate(prompt="still here", sampling=pb.SamplingParams(max_tokens=3))
    assert responses[-1].finish_reason in (pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP)
    assert_back_to_baseline(cluster)


def baseline_state(cluster) -> dict[str, tuple]:
    state = {}
    for worker_id in cluster.workers():
        stats = cluster.stats(worker_id)
        state[worker_id] = (
            stats.num_waiting,
            stats.num_running,
            stats.num_used_blocks,
            stats.num_live_tails,
        )
    return state


def assert_back_to_baseline(cluster, timeout_s: float = 10.0) -> None:
    """Every worker idle: no queued or running request, no used block, no live tail."""
    idle = {worker_id: (0, 0, 0, 0) for worker_id in cluster.workers()}
    deadline = time.monotonic() + timeout_s
    while (state := baseline_state(cluster)) != idle:
        if time.monotonic() > deadline:
            pytest.fail(f"workers not back to baseline: {state}")
        time.sleep(0.1)


def num_generated(cluster) -> int:
    return sum(
        cluster.stats(w).num_generated_tokens_total
        for w in cluster.workers()
        if w.startswith("decode")
    )


def assert_stopped_early(cluster, generated_before: int, max_new_tokens: int) -> None:
    """The cancelled work stopped: the workers did not go on to generate every token."""
    assert_back_to_baseline(cluster)
    generated = num_generated(cluster) - generated_before
    assert generated < max_new_tokens, f"{generated} tokens generated after the cancel"


def long_prompt(n: int) -> list[int]:
    return [3 + (i * 7919) % 250 for i in range(n)]


@pytest.mark.parametrize(
    ("prompt_len", "max_tokens", "deadline_s"),
    [(400, 100, 0.005), (400, 100, 0.03), (400, 100, 0.08), (100, 400, 0.25)],
    ids=["queued", "prefilling", "transferring", "decoding"],
)
def test_deadline_in_each_phase_frees_everything(cluster, prompt_len, max_tokens, deadline_s):
    """The deadline propagates to the workers; wherever it strikes, nothing leaks."""
    before = num_generated(cluster)
    with pytest.raises(grpc.RpcError) as err:
        list(
            cluster.generator.Generate(
                pb.GenerateRequest(
                    prompt_token_ids=long_prompt(prompt_len),
                    sampling=pb.SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                ),
                timeout=deadline_s,
            )
        )
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert_stopped_early(cluster, before, max_tokens - 1)


def test_client_cancel_while_decoding_frees_everything(cluster):
    before = num_generated(cluster)
    call = cluster.generator.Generate(
        pb.GenerateRequest(
            prompt_token_ids=long_prompt(100),
            sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True),
        ),
        timeout=60,
    )
    first = next(call)
    assert first.token_ids
    time.sleep(0.2)
    call.cancel()
    assert_stopped_early(cluster, before, 399)


def test_concurrent_cancels_while_queued_and_running_free_everything(cluster):
    before = num_generated(cluster)
    calls = [
        cluster.generator.Generate(
            pb.GenerateRequest(
                prompt_token_ids=long_prompt(200 + i),
                sampling=pb.SamplingParams(max_tokens=300, ignore_eos=True),
            ),
            timeout=60,
        )
        for i in range(6)
    ]
    timers = [threading.Timer(0.05 * i, call.cancel) for i, call in enumerate(calls)]
    for timer in timers:
        timer.start()
    for timer in timers:
        timer.join()
    for call in calls:
        with pytest.raises(grpc.RpcError):
            list(call)
    assert_stopped_early(cluster, before, 6 * 299)


def test_past_the_admission_limit_requests_get_resource_exhausted(cluster):
    streams = [
        cluster.generator.Generate(
            pb.GenerateRequest(
                prompt_token_ids=long_prompt(20),
                sampling=pb.SamplingParams(max_tokens=400, ignore_eos=True),
            ),
            timeout=60,
        )
        for _ in range(cluster.max_inflight)
    ]
    for stream in streams:
        next(stream)  # all admitted and generating
    with pytest.raises(grpc.RpcError) as err:
        cluster.generate(prompt="one too many", sampling=pb.SamplingParams(max_tokens=2))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "retry later" in err.value.details()
    for stream in streams:
        stream.cancel()
    assert_back_to_baseline(cluster)
    cluster.generate(prompt="admitted again", sampling=pb.SamplingParams(max_tokens=2))
