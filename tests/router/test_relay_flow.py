"""The router's request path without sockets: `RequestRelay` over a real `Cluster`
and a scripted `WorkerClient`. Covers prefill failover, the tail released in each
way a request can end before a decode worker took it (and only then), and the
finish-reason precedence in the disaggregated, colocated and local paths."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import grpc
import pytest

from model.sampling_params import SamplingParams
from model.tokenizer import ByteTokenizer
from protos import generator_pb2 as pb
from protos import workers_pb2 as wpb
from router.cluster import Cluster
from router.relay import RequestRelay
from router.relay_error import RelayError
from router.routing import PrefixLoadPolicy
from router.validation import RequestLimits
from router.worker_client import WorkerCallError, WorkerClient
from telemetry.metrics import ServiceMetrics

MODEL = "test:relay"
BLOCK_SIZE = 4
PROMPT = list(b"hello world")  # 11 tokens: 2 full blocks and a tail


class FakeChannel:
    async def close(self) -> None:
        pass


class ScriptedWorkers(WorkerClient):
    """Answers each call from a script per worker, and records every call.

    `prefills[worker]` is a function of the PrefillRequest returning a result or
    raising; `decodes[worker]` a list of DecodeResponses, or of exceptions raised
    in their place; `gates` holds events a call waits on before answering.
    """

    def __init__(self) -> None:
        self.prefills: dict[str, Callable[[wpb.PrefillRequest], wpb.PrefillResult]] = {}
        self.decodes: dict[str, list[wpb.DecodeResponse | Exception]] = {}
        self.gates: dict[str, asyncio.Event] = {}
        self.prefill_calls: list[tuple[str, str]] = []
        self.decode_calls: list[tuple[str, wpb.DecodeRequest]] = []
        self.releases: list[tuple[str, str]] = []

    async def prefill(self, worker_id, request, timeout_s):
        self.prefill_calls.append((worker_id, request.request_id))
        if "prefill" in self.gates:
            await self.gates["prefill"].wait()
        return self.prefills[worker_id](request)

    async def release(self, worker_id, request_id):
        self.releases.append((worker_id, request_id))

    async def count_resident(self, worker_id, block_hashes, timeout_s):
        return 0

    async def decode(self, worker_id, request, timeout_s, trace_context=None):
        self.decode_calls.append((worker_id, request))
        for item in self.decodes[worker_id]:
            if "decode" in self.gates:
                await self.gates["decode"].wait()
            if isinstance(item, Exception):
                raise item
            yield item


def prefilled(
    first_token: int, *, has_tail: bool = True, finish: int = pb.FINISH_REASON_UNSPECIFIED
) -> Callable[[wpb.PrefillRequest], wpb.PrefillResult]:
    def answer(request: wpb.PrefillRequest) -> wpb.PrefillResult:
        return wpb.PrefillResult(
            first_token_id=first_token,
            has_tail=has_tail,
            tail_id=request.request_id if has_tail else "",
            finish_reason=finish,
            num_cached_tokens=4,
        )

    return answer


def failing(code: grpc.StatusCode) -> Callable[[wpb.PrefillRequest], wpb.PrefillResult]:
    def answer(request: wpb.PrefillRequest) -> wpb.PrefillResult:
        raise WorkerCallError("?", code, "scripted failure")

    return answer


def decoded(text: bytes, finish: int = pb.FINISH_REASON_UNSPECIFIED) -> wpb.DecodeResponse:
    return wpb.DecodeResponse(token_ids=list(text), finish_reason=finish)


async def make_relay(
    workers: ScriptedWorkers,
    prefill_ids: Sequence[str] = ("p0",),
    decode_ids: Sequence[str] = ("d0",),
    max_local_prefill_len: int = 0,
) -> RequestRelay:
    cluster = Cluster(MODEL, PrefixLoadPolicy(), connect=lambda address: FakeChannel())
    for role, ids in ((wpb.WORKER_ROLE_PREFILL, prefill_ids), (wpb.WORKER_ROLE_DECODE, decode_ids)):
        for worker_id in ids:
            await cluster.register(
                wpb.RegisterRequest(
                    worker_id=worker_id,
                    role=role,
                    address=f"{worker_id}:1",
                    model=MODEL,
                    kv_fingerprint=b"f" * 16,
                    block_size=BLOCK_SIZE,
                    vocab_size=259,
                    max_context_len=512,
                    max_local_prefill_len=max_local_prefill_len,
                )
            )
    metrics = ServiceMetrics(MODEL, "router")
    return RequestRelay(cluster, workers, ByteTokenizer(), RequestLimits(), 8, metrics)


def generate(
    workers: ScriptedWorkers, sampling: pb.SamplingParams | None = None, **relay_args
) -> list[pb.GenerateResponse]:
    async def scenario():
        relay = await make_relay(workers, **relay_args)
        request = pb.GenerateRequest(
            request_id="r", prompt_token_ids=PROMPT, sampling=sampling or pb.SamplingParams()
        )
        responses = [m async for m in relay.generate(request, time_remaining=None)]
        await relay.calls.wait_background(1)
        return responses

    return asyncio.run(scenario())


def text_of(responses: list[pb.GenerateResponse]) -> str:
    return "".join(r.text for r in responses)


def test_prefill_fails_over_when_a_worker_is_gone_and_releases_that_attempts_tail() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {
        "p0": failing(grpc.StatusCode.UNAVAILABLE),
        "p1": prefilled(ord("A")),
    }
    workers.decodes = {"d0": [decoded(b"BC", pb.FINISH_REASON_LENGTH)]}
    responses = generate(workers, prefill_ids=("p0", "p1"))
    assert text_of(responses) == "ABC"
    assert workers.prefill_calls == [("p0", "r.p1"), ("p1", "r.p2")]
    # The decode worker was told where the surviving attempt's tail is.
    assert workers.decode_calls[0][1].prefill.tail_id == "r.p2"
    assert workers.releases == [("p0", "r.p1")]  # the failed attempt's, never the retry's


def test_prefill_failure_other_than_unavailable_is_the_requests_and_releases_the_tail() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": failing(grpc.StatusCode.INTERNAL), "p1": prefilled(1)}
    with pytest.raises(RelayError) as err:
        generate(workers, prefill_ids=("p0", "p1"))
    assert err.value.code == grpc.StatusCode.INTERNAL
    assert len(workers.prefill_calls) == 1
    assert workers.releases == [("p0", "r.p1")]


def test_no_prefill_worker_left_is_unavailable() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": failing(grpc.StatusCode.UNAVAILABLE)}
    with pytest.raises(RelayError) as err:
        generate(workers)
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert workers.releases == [("p0", "r.p1")]


def test_a_decode_failure_before_its_first_message_releases_the_tail() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {"d0": [WorkerCallError("d0", grpc.StatusCode.INTERNAL, "boom")]}
    with pytest.raises(RelayError, match="decode failed: boom"):
        generate(workers)
    assert workers.releases == [("p0", "r.p1")]


def test_a_decode_failure_after_its_first_message_leaves_the_tail_to_the_decode_worker() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {
        "d0": [decoded(b"B"), WorkerCallError("d0", grpc.StatusCode.UNAVAILABLE, "gone")]
    }
    with pytest.raises(RelayError):
        generate(workers)
    assert workers.releases == []  # the decode worker had taken (and deleted) it


def test_a_stop_string_in_the_first_token_releases_the_tail() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("X"))}
    workers.decodes = {"d0": []}
    responses = generate(workers, pb.SamplingParams(stop=["X"]))
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP
    assert workers.decode_calls == []  # decode never started
    assert workers.releases == [("p0", "r.p1")]


def test_a_prefill_without_a_tail_releases_nothing() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("A"), has_tail=False, finish=pb.FINISH_REASON_STOP)}
    responses = generate(workers)
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP
    assert workers.releases == []


def test_a_client_that_leaves_during_prefill_releases_the_tail() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(1)}

    async def scenario():
        relay = await make_relay(workers)
        workers.gates["prefill"] = asyncio.Event()
        request = pb.GenerateRequest(request_id="r", prompt_token_ids=PROMPT)
        task = asyncio.ensure_future(anext(relay.generate(request, None)))
        while not workers.prefill_calls:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await relay.calls.wait_background(1)
        assert relay.stats.num_inflight == 0

    asyncio.run(scenario())
    assert workers.releases == [("p0", "r.p1")]


def test_a_client_that_leaves_before_the_first_decode_message_releases_the_tail() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {"d0": [decoded(b"B", pb.FINISH_REASON_LENGTH)]}

    async def scenario():
        relay = await make_relay(workers)
        workers.gates["decode"] = asyncio.Event()
        request = pb.GenerateRequest(request_id="r", prompt_token_ids=PROMPT)
        stream = relay.generate(request, None)
        assert (await anext(stream)).text == "A"  # the prefill worker's token
        task = asyncio.ensure_future(anext(stream))
        while not workers.decode_calls:
            await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await relay.calls.wait_background(1)

    asyncio.run(scenario())
    assert workers.releases == [("p0", "r.p1")]


def test_a_deadline_that_passes_during_prefill_releases_the_tail() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {"d0": [decoded(b"B", pb.FINISH_REASON_LENGTH)]}

    async def scenario():
        relay = await make_relay(workers)
        request = pb.GenerateRequest(request_id="r", prompt_token_ids=PROMPT)
        # The deadline is over by the time the decode call would start.
        original = workers.prefills["p0"]

        def slow(req):
            import time

            time.sleep(0.05)
            return original(req)

        workers.prefills["p0"] = slow
        with pytest.raises(RelayError) as err:
            _ = [m async for m in relay.generate(request, time_remaining=0.02)]
        await relay.calls.wait_background(1)
        return err.value

    error = asyncio.run(scenario())
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert workers.releases == [("p0", "r.p1")]


# Finish-reason precedence: a stop string that matches wins over LENGTH, wherever
# the token that completes it was sampled.


def test_precedence_disaggregated_a_stop_string_on_the_prefill_token_with_max_tokens_1() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("X"), has_tail=False, finish=pb.FINISH_REASON_LENGTH)}
    responses = generate(workers, pb.SamplingParams(max_tokens=1, stop=["X"]))
    assert (text_of(responses), responses[-1].finish_reason) == ("", pb.FINISH_REASON_STOP)


def test_precedence_disaggregated_a_stop_string_on_the_last_decode_token() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {"d0": [decoded(b"BX", pb.FINISH_REASON_LENGTH)]}
    responses = generate(workers, pb.SamplingParams(max_tokens=3, stop=["X"]))
    assert (text_of(responses), responses[-1].finish_reason) == ("AB", pb.FINISH_REASON_STOP)


def test_precedence_colocated_a_stop_string_on_the_last_token() -> None:
    workers = ScriptedWorkers()
    workers.decodes = {"d0": [decoded(b"AB"), decoded(b"X", pb.FINISH_REASON_LENGTH)]}
    responses = generate(
        workers, pb.SamplingParams(max_tokens=3, stop=["X"]), max_local_prefill_len=64
    )
    assert workers.prefill_calls == []  # prefilled on the decode worker
    assert (text_of(responses), responses[-1].finish_reason) == ("AB", pb.FINISH_REASON_STOP)
    assert responses[-1].usage.completion_tokens == 3


def test_precedence_local_engine_a_stop_token_on_the_last_token() -> None:
    from deploy.local_generate import generate_with_engine
    from model.generation import generate as reference
    from model.loader import load_model

    tiny = load_model("dummy:tiny")
    prompt = tiny.tokenizer.encode("kvrelay")
    greedy = reference(tiny, [prompt], SamplingParams(max_tokens=3, ignore_eos=True))
    last = greedy[0].token_ids[-1]
    params = SamplingParams(max_tokens=3, ignore_eos=True, stop_token_ids=(last,))
    outputs = [out for _, out in generate_with_engine(tiny, [prompt], params)]
    assert [o.token_id for o in outputs] == greedy[0].token_ids
    assert outputs[-1].finish_reason.value == "stop"
