"""The router's request path without sockets: `RequestRelay` over a real `Cluster`
and a scripted `WorkerClient`. Covers internal ids, prefill retry and local
prefill, decode resume (tokens once each, the migration bound, the token timeout, a
worker declared lost), draining, the tail released in each way a request can end
before a decode worker took it (and only then), and the finish-reason precedence in
the disaggregated, colocated and local paths."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence

import grpc
import pytest

from model.sampling_params import SamplingParams
from model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from protos import generator_pb2 as pb
from protos import workers_pb2 as wpb
from router.cluster import Cluster
from router.relay import RequestRelay
from router.relay_error import RelayError
from router.routing import PrefixLoadPolicy
from router.validation import InvalidRequest, RequestLimits
from router.worker_calls import FailoverConfig
from router.worker_client import WorkerCallError, WorkerClient
from telemetry.metrics import ServiceMetrics

MODEL = "test:relay"
BLOCK_SIZE = 4
PROMPT = list(b"hello world")  # 11 tokens: 2 full blocks and a tail


class FakeChannel:
    async def close(self) -> None:
        pass


class Calls(list):
    """Scripts for a worker's successive decode calls, one per call, in order."""


class ScriptedWorkers(WorkerClient):
    """Answers each call from a script per worker, and records every call.

    `prefills[worker]` is a function of the PrefillRequest returning a result or
    raising; `decodes[worker]` a list of DecodeResponses, or of exceptions raised
    in their place (the same for every call), or `Calls` of such lists (one per
    call); `gates` holds events a call waits on before answering.
    """

    def __init__(self) -> None:
        self.prefills: dict[str, Callable[[wpb.PrefillRequest], wpb.PrefillResult]] = {}
        self.decodes: dict[str, list] = {}
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
        script = self.decodes[worker_id]
        if isinstance(script, Calls):
            script = script.pop(0)
        for item in script:
            if "decode" in self.gates:
                await self.gates["decode"].wait()
            if isinstance(item, Exception):
                raise item
            yield item


class StallsOnD0(ScriptedWorkers):
    """d0 goes silent after its script (never fails, never ends)."""

    async def decode(self, worker_id, request, timeout_s, trace_context=None):
        async for item in super().decode(worker_id, request, timeout_s, trace_context):
            yield item
        if worker_id == "d0":
            await asyncio.Event().wait()


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


def gone(worker_id: str, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE) -> WorkerCallError:
    return WorkerCallError(worker_id, code, "scripted failure")


async def make_relay(
    workers: ScriptedWorkers,
    prefill_ids: Sequence[str] = ("p0",),
    decode_ids: Sequence[str] = ("d0",),
    max_local_prefill_len: int = 0,
    failover: FailoverConfig | None = None,
    tokenizer: Tokenizer | None = None,
    limits: RequestLimits | None = None,
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
    return RequestRelay(
        cluster,
        workers,
        tokenizer or ByteTokenizer(),
        limits or RequestLimits(),
        8,
        metrics,
        failover,
    )


def generate(
    workers: ScriptedWorkers,
    sampling: pb.SamplingParams | None = None,
    request_id: str = "r",
    **relay_args,
) -> list[pb.GenerateResponse]:
    async def scenario():
        relay = await make_relay(workers, **relay_args)
        request = pb.GenerateRequest(
            request_id=request_id, prompt_token_ids=PROMPT, sampling=sampling or pb.SamplingParams()
        )
        responses = [m async for m in relay.generate(request, time_remaining=None)]
        await relay.calls.wait_background(1)
        return responses

    return asyncio.run(scenario())


def text_of(responses: list[pb.GenerateResponse]) -> str:
    return "".join(r.text for r in responses)


def internal_id(call_id: str) -> str:
    """The router's id for the request, from a worker call's id (`<id>.p1`, `<id>.d2`)."""
    return call_id.rsplit(".", 1)[0]


def attempts(call_ids: Sequence[str]) -> list[str]:
    return [call_id.rsplit(".", 1)[1] for call_id in call_ids]


# Internal ids: the client's request_id is echoed, never a key inside the cluster.


def test_every_call_uses_the_routers_internal_id_and_the_client_id_is_only_echoed() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {"d0": [decoded(b"B", pb.FINISH_REASON_LENGTH)]}
    responses = generate(workers)
    assert {r.request_id for r in responses} == {"r"}
    (_, prefill_id), (_, decode) = workers.prefill_calls[0], workers.decode_calls[0]
    assert internal_id(prefill_id) == internal_id(decode.request_id) != "r"
    assert "r" not in {prefill_id, decode.request_id, decode.prefill.tail_id}


def test_two_requests_with_one_client_id_get_distinct_internal_ids() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {"d0": [decoded(b"B", pb.FINISH_REASON_LENGTH)]}

    async def run_both():
        relay = await make_relay(workers)
        request = pb.GenerateRequest(request_id="same", prompt_token_ids=PROMPT)

        async def one():
            return [m async for m in relay.generate(request, None)]

        return await asyncio.gather(one(), one())

    both = asyncio.run(run_both())
    assert [text_of(r) for r in both] == ["AB", "AB"]
    ids = {internal_id(request_id) for _, request_id in workers.prefill_calls}
    assert len(ids) == 2
    assert len({internal_id(d.request_id) for _, d in workers.decode_calls}) == 2


def test_a_request_id_over_128_bytes_is_invalid_argument() -> None:
    workers = ScriptedWorkers()
    with pytest.raises(InvalidRequest, match="request_id is 129 bytes; the limit is 128"):
        generate(workers, request_id="x" * 129)
    assert workers.prefill_calls == [] and workers.decode_calls == []
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {"d0": [decoded(b"B", pb.FINISH_REASON_LENGTH)]}
    assert text_of(generate(workers, request_id="é" * 64)) == "AB"  # 128 bytes


def test_the_cache_salt_reaches_the_prefill_and_every_decode_call() -> None:
    workers = ScriptedWorkers()
    sent_to_prefill: list[wpb.PrefillRequest] = []

    def answer(request: wpb.PrefillRequest) -> wpb.PrefillResult:
        sent_to_prefill.append(request)
        return prefilled(ord("A"))(request)

    workers.prefills = {"p0": answer}
    workers.decodes = {
        "d0": [decoded(b"B"), gone("d0")],
        "d1": [decoded(b"C", pb.FINISH_REASON_LENGTH)],
    }

    async def scenario():
        relay = await make_relay(workers, decode_ids=("d0", "d1"))
        request = pb.GenerateRequest(prompt_token_ids=PROMPT, cache_salt="tenant-a")
        return [m async for m in relay.generate(request, time_remaining=None)]

    assert text_of(asyncio.run(scenario())) == "ABC"
    assert [r.cache_salt for r in sent_to_prefill] == ["tenant-a"]
    assert [d.cache_salt for _, d in workers.decode_calls] == ["tenant-a", "tenant-a"]


def test_without_a_cache_salt_no_worker_call_carries_one() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {"d0": [decoded(b"B", pb.FINISH_REASON_LENGTH)]}
    assert text_of(generate(workers)) == "AB"
    assert not workers.decode_calls[0][1].HasField("cache_salt")


# Prefill: any failure of the worker is retried once on another, then the decode
# worker prefills; each attempt's tail is released, never the next attempt's.


@pytest.mark.parametrize(
    "code",
    [
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    ],
)
def test_a_failed_prefill_is_retried_on_another_worker_and_its_tail_released(code) -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": failing(code), "p1": prefilled(ord("A"))}
    workers.decodes = {"d0": [decoded(b"BC", pb.FINISH_REASON_LENGTH)]}
    responses = generate(workers, prefill_ids=("p0", "p1"))
    assert text_of(responses) == "ABC"
    (first_worker, first_id), (second_worker, second_id) = workers.prefill_calls
    assert (first_worker, second_worker) == ("p0", "p1")
    assert attempts([first_id, second_id]) == ["p1", "p2"]
    # The decode worker was told where the surviving attempt's tail is.
    assert workers.decode_calls[0][1].prefill.tail_id == second_id
    assert workers.releases == [("p0", first_id)]  # the failed attempt's, never the retry's


def test_the_prefill_retry_counter_counts_failed_attempts() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": failing(grpc.StatusCode.INTERNAL), "p1": prefilled(ord("A"))}
    workers.decodes = {"d0": [decoded(b"B", pb.FINISH_REASON_LENGTH)]}

    async def scenario():
        relay = await make_relay(workers, prefill_ids=("p0", "p1"))
        request = pb.GenerateRequest(request_id="r", prompt_token_ids=PROMPT)
        assert "".join([m.text async for m in relay.generate(request, None)]) == "AB"
        return relay._snapshot()

    snapshot = asyncio.run(scenario())
    assert (snapshot.prefill_retries_total, snapshot.request_migrations_total) == (1, 0)


def test_when_every_prefill_attempt_fails_the_decode_worker_prefills_the_prompt() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {
        "p0": failing(grpc.StatusCode.INTERNAL),
        "p1": failing(grpc.StatusCode.UNAVAILABLE),
        "p2": prefilled(ord("Z")),  # never tried: two attempts at most
    }
    workers.decodes = {"d0": [decoded(b"AB", pb.FINISH_REASON_LENGTH)]}
    responses = generate(workers, prefill_ids=("p0", "p1", "p2"))
    assert text_of(responses) == "AB"
    assert len(workers.prefill_calls) == 2
    decode = workers.decode_calls[0][1]
    assert not decode.HasField("prefill") and list(decode.generated_token_ids) == []
    assert sorted(workers.releases) == sorted(workers.prefill_calls)


def test_the_only_prefill_worker_failing_leaves_the_prompt_to_the_decode_worker() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": failing(grpc.StatusCode.UNAVAILABLE)}
    workers.decodes = {"d0": [decoded(b"AB", pb.FINISH_REASON_LENGTH)]}
    assert text_of(generate(workers)) == "AB"
    assert not workers.decode_calls[0][1].HasField("prefill")
    assert workers.releases == workers.prefill_calls


def test_a_prefill_refusing_the_request_is_the_requests_error_and_not_retried() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": failing(grpc.StatusCode.INVALID_ARGUMENT), "p1": prefilled(1)}
    with pytest.raises(RelayError) as err:
        generate(workers, prefill_ids=("p0", "p1"))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(workers.prefill_calls) == 1
    assert workers.releases == workers.prefill_calls


def test_a_hung_prefill_worker_counts_as_failed_after_the_token_timeout() -> None:
    hung = asyncio.Event()

    class HungFirst(ScriptedWorkers):
        async def prefill(self, worker_id, request, timeout_s):
            if worker_id == "p0":
                self.prefill_calls.append((worker_id, request.request_id))
                try:
                    async with asyncio.timeout(timeout_s):
                        await hung.wait()
                except TimeoutError:
                    raise WorkerCallError(
                        worker_id, grpc.StatusCode.DEADLINE_EXCEEDED, ""
                    ) from None
            return await super().prefill(worker_id, request, timeout_s)

    workers = HungFirst()
    workers.prefills = {"p1": prefilled(ord("A"))}
    workers.decodes = {"d0": [decoded(b"B", pb.FINISH_REASON_LENGTH)]}
    responses = generate(
        workers, prefill_ids=("p0", "p1"), failover=FailoverConfig(token_timeout_s=0.05)
    )
    assert text_of(responses) == "AB"
    assert [w for w, _ in workers.prefill_calls] == ["p0", "p1"]


# Decode failover: the request resumes on another decode worker with the tokens the
# client has; the client sees each token once.


def test_a_decode_worker_failing_mid_stream_resumes_on_another_with_the_sent_tokens() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {
        "d0": [decoded(b"B"), decoded(b"C"), gone("d0")],
        "d1": [decoded(b"D"), decoded(b"E", pb.FINISH_REASON_LENGTH)],
    }
    responses = generate(workers, decode_ids=("d0", "d1"))
    assert text_of(responses) == "ABCDE"
    assert responses[-1].usage.completion_tokens == 5
    (first_worker, first), (second_worker, resumed) = workers.decode_calls
    assert (first_worker, second_worker) == ("d0", "d1")
    assert attempts([first.request_id, resumed.request_id]) == ["d1", "d2"]
    assert internal_id(first.request_id) == internal_id(resumed.request_id)
    assert not resumed.HasField("prefill")
    assert list(resumed.prompt_token_ids) == PROMPT
    assert bytes(resumed.generated_token_ids) == b"ABC"
    assert workers.releases == []  # d0 had taken the tail with its first message


class DrainsD0AfterB(ScriptedWorkers):
    """d0 says it is draining after its first token, then fails; `on_drain` runs then."""

    def __init__(self, on_drain: Callable[[], None]) -> None:
        super().__init__()
        self.on_drain = on_drain

    async def decode(self, worker_id, request, timeout_s, trace_context=None):
        async for item in super().decode(worker_id, request, timeout_s, trace_context):
            yield item
            if worker_id == "d0":
                self.on_drain()
                raise gone("d0")


def resume_with_d1_stalled(unstall_after_s: float | None) -> tuple[list, float]:
    """d1 is stalled when d0 drains and fails mid-stream; it recovers after
    `unstall_after_s` (None: never). The responses (or the error) and the time taken."""
    relay_box: list[RequestRelay] = []

    def on_drain() -> None:
        cluster = relay_box[0].cluster
        cluster.heartbeat(wpb.HeartbeatRequest(worker_id="d0", is_draining=True))
        if unstall_after_s is not None:
            recover = wpb.HeartbeatRequest(worker_id="d1", is_stalled=False)
            asyncio.get_running_loop().call_later(unstall_after_s, cluster.heartbeat, recover)

    workers = DrainsD0AfterB(on_drain)
    workers.decodes = {
        "d0": [decoded(b"B")],
        "d1": [decoded(b"C", pb.FINISH_REASON_LENGTH)],
    }

    async def scenario():
        relay = await make_relay(workers, prefill_ids=(), decode_ids=("d0", "d1"))
        relay_box.append(relay)
        relay.cluster.heartbeat(wpb.HeartbeatRequest(worker_id="d1", is_stalled=True))
        request = pb.GenerateRequest(request_id="r", prompt_token_ids=PROMPT)
        start = time.monotonic()
        try:
            return [m async for m in relay.generate(request, None)], time.monotonic() - start
        except RelayError as err:
            return [err], time.monotonic() - start

    return asyncio.run(scenario())


def test_a_resume_waits_for_a_decode_worker_to_become_routable() -> None:
    responses, elapsed = resume_with_d1_stalled(unstall_after_s=0.3)
    assert text_of(responses) == "BC" and 0.3 <= elapsed < 5


def test_a_resume_with_no_routable_decode_worker_fails_after_a_bounded_wait(monkeypatch) -> None:
    monkeypatch.setattr("router.worker_calls.ROUTABLE_WAIT_S", 0.3)
    (error,), elapsed = resume_with_d1_stalled(unstall_after_s=None)
    assert isinstance(error, RelayError) and error.code == grpc.StatusCode.UNAVAILABLE
    assert "no decode worker became routable in 0.3 s" in error.message
    assert 0.3 <= elapsed < 5


def test_a_decode_failure_before_its_first_message_resumes_and_releases_the_tail() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {
        "d0": [gone("d0", grpc.StatusCode.INTERNAL)],
        "d1": [decoded(b"B", pb.FINISH_REASON_LENGTH)],
    }
    responses = generate(workers, decode_ids=("d0", "d1"))
    assert text_of(responses) == "AB"
    resumed = workers.decode_calls[1][1]
    assert bytes(resumed.generated_token_ids) == b"A"
    assert workers.releases == workers.prefill_calls  # no decode worker took it


def test_a_colocated_request_resumes_after_its_first_tokens() -> None:
    workers = ScriptedWorkers()
    workers.decodes = {
        "d0": Calls([[decoded(b"AB"), gone("d0")], [decoded(b"C", pb.FINISH_REASON_LENGTH)]])
    }
    responses = generate(workers, prefill_ids=(), decode_ids=("d0",))
    assert text_of(responses) == "ABC"
    # The only decode worker is tried again: it may have restarted.
    assert [w for w, _ in workers.decode_calls] == ["d0", "d0"]
    assert bytes(workers.decode_calls[1][1].generated_token_ids) == b"AB"


def test_a_request_moves_at_most_max_migrations_times_then_fails() -> None:
    workers = ScriptedWorkers()
    workers.decodes = {"d0": [decoded(b"A"), gone("d0")], "d1": [decoded(b"B"), gone("d1")]}
    with pytest.raises(RelayError) as err:
        generate(
            workers,
            prefill_ids=(),
            decode_ids=("d0", "d1"),
            failover=FailoverConfig(max_migrations=2),
        )
    assert err.value.code == grpc.StatusCode.UNAVAILABLE
    assert len(workers.decode_calls) == 3
    assert [bytes(d.generated_token_ids) for _, d in workers.decode_calls] == [b"", b"A", b"AB"]


def test_a_decode_worker_refusing_the_request_is_not_resumed() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {
        "d0": [gone("d0", grpc.StatusCode.INVALID_ARGUMENT)],
        "d1": [decoded(b"B", pb.FINISH_REASON_LENGTH)],
    }
    with pytest.raises(RelayError) as err:
        generate(workers, decode_ids=("d0", "d1"))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(workers.decode_calls) == 1
    assert workers.releases == workers.prefill_calls


def test_a_decode_worker_that_stops_sending_tokens_is_failed_after_the_token_timeout() -> None:
    workers = StallsOnD0()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {"d0": [decoded(b"B")], "d1": [decoded(b"C", pb.FINISH_REASON_LENGTH)]}
    responses = generate(
        workers, decode_ids=("d0", "d1"), failover=FailoverConfig(token_timeout_s=0.05)
    )
    assert text_of(responses) == "ABC"
    assert bytes(workers.decode_calls[1][1].generated_token_ids) == b"AB"


def test_a_worker_declared_lost_fails_its_streams_over_at_once() -> None:
    workers = StallsOnD0()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {"d0": [decoded(b"B")], "d1": [decoded(b"C", pb.FINISH_REASON_LENGTH)]}

    async def scenario():
        relay = await make_relay(workers, decode_ids=("d0", "d1"))  # token timeout 60 s
        request = pb.GenerateRequest(request_id="r", prompt_token_ids=PROMPT)
        stream = relay.generate(request, None)
        texts = [(await anext(stream)).text, (await anext(stream)).text]
        pending = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0.01)
        assert not pending.done()
        relay.cluster.registry.get("d0").declare_lost()
        async with asyncio.timeout(1):
            texts.append((await pending).text)
        texts += [m.text async for m in stream]
        return texts

    assert "".join(asyncio.run(scenario())) == "ABC"
    assert [w for w, _ in workers.decode_calls] == ["d0", "d1"]


def test_a_full_decode_worker_is_skipped_without_counting_a_migration() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("A"))}
    workers.decodes = {
        "d0": [gone("d0", grpc.StatusCode.RESOURCE_EXHAUSTED)],
        "d1": [decoded(b"B", pb.FINISH_REASON_LENGTH)],
    }

    async def scenario():
        relay = await make_relay(workers, decode_ids=("d0", "d1"))
        request = pb.GenerateRequest(request_id="r", prompt_token_ids=PROMPT)
        assert "".join([m.text async for m in relay.generate(request, None)]) == "AB"
        await relay.calls.wait_background(1)
        return relay._snapshot().request_migrations_total

    assert asyncio.run(scenario()) == 0
    (_, first), (_, second) = workers.decode_calls
    assert second.HasField("prefill") and second.prefill.tail_id == first.prefill.tail_id
    assert workers.releases == []  # d1 took the tail


def test_when_every_decode_worker_is_full_the_client_gets_resource_exhausted() -> None:
    workers = ScriptedWorkers()
    workers.decodes = {
        "d0": [gone("d0", grpc.StatusCode.RESOURCE_EXHAUSTED)],
        "d1": [gone("d1", grpc.StatusCode.RESOURCE_EXHAUSTED)],
    }
    with pytest.raises(RelayError) as err:
        generate(workers, prefill_ids=(), decode_ids=("d0", "d1"))
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "every decode worker is full" in err.value.message
    assert [w for w, _ in workers.decode_calls] == ["d0", "d1"]


def test_a_draining_worker_gets_no_new_requests() -> None:
    workers = ScriptedWorkers()
    workers.decodes = {"d0": [decoded(b"X")], "d1": [decoded(b"A", pb.FINISH_REASON_LENGTH)]}

    async def scenario():
        relay = await make_relay(workers, prefill_ids=(), decode_ids=("d0", "d1"))
        relay.cluster.heartbeat(wpb.HeartbeatRequest(worker_id="d0", is_draining=True))
        for _ in range(3):
            request = pb.GenerateRequest(request_id="r", prompt_token_ids=PROMPT)
            assert "".join([m.text async for m in relay.generate(request, None)]) == "A"

    asyncio.run(scenario())
    assert {w for w, _ in workers.decode_calls} == {"d1"}


def test_a_stalled_worker_gets_no_requests_until_it_recovers() -> None:
    workers = ScriptedWorkers()
    workers.decodes = {
        "d0": [decoded(b"A", pb.FINISH_REASON_LENGTH)],
        "d1": [decoded(b"A", pb.FINISH_REASON_LENGTH)],
    }

    async def scenario():
        relay = await make_relay(workers, prefill_ids=(), decode_ids=("d0", "d1"))
        request = pb.GenerateRequest(request_id="r", prompt_token_ids=PROMPT)
        relay.cluster.heartbeat(wpb.HeartbeatRequest(worker_id="d0", is_stalled=True))
        for _ in range(2):
            _ = [m async for m in relay.generate(request, None)]
        relay.cluster.heartbeat(wpb.HeartbeatRequest(worker_id="d0", is_stalled=False))
        relay.cluster.heartbeat(wpb.HeartbeatRequest(worker_id="d1", is_stalled=True))
        _ = [m async for m in relay.generate(request, None)]

    asyncio.run(scenario())
    assert [w for w, _ in workers.decode_calls] == ["d1", "d1", "d0"]


def test_a_draining_router_refuses_new_requests_with_unavailable() -> None:
    workers = ScriptedWorkers()

    async def scenario():
        relay = await make_relay(workers)
        relay.is_draining = True
        request = pb.GenerateRequest(request_id="r", prompt_token_ids=PROMPT)
        with pytest.raises(RelayError) as err:
            await anext(relay.generate(request, None))
        return err.value

    assert asyncio.run(scenario()).code == grpc.StatusCode.UNAVAILABLE


def test_the_migration_counter_counts_resumes() -> None:
    workers = ScriptedWorkers()
    workers.decodes = {
        "d0": [decoded(b"A"), gone("d0")],
        "d1": [decoded(b"B", pb.FINISH_REASON_LENGTH)],
    }

    async def scenario():
        relay = await make_relay(workers, prefill_ids=(), decode_ids=("d0", "d1"))
        request = pb.GenerateRequest(request_id="r", prompt_token_ids=PROMPT)
        assert "".join([m.text async for m in relay.generate(request, None)]) == "AB"
        return relay._snapshot().request_migrations_total

    assert asyncio.run(scenario()) == 1


# The tail: released in each way a request can end before a decode worker took it,
# and only then.


def test_a_stop_string_in_the_first_token_releases_the_tail() -> None:
    workers = ScriptedWorkers()
    workers.prefills = {"p0": prefilled(ord("X"))}
    workers.decodes = {"d0": []}
    responses = generate(workers, pb.SamplingParams(stop=["X"]))
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP
    assert workers.decode_calls == []  # decode never started
    assert workers.releases == workers.prefill_calls


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
    assert workers.releases == workers.prefill_calls


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
    assert workers.releases == workers.prefill_calls


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
            time.sleep(0.05)
            return original(req)

        workers.prefills["p0"] = slow
        with pytest.raises(RelayError) as err:
            _ = [m async for m in relay.generate(request, time_remaining=0.02)]
        await relay.calls.wait_background(1)
        return err.value

    error = asyncio.run(scenario())
    assert error.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert workers.releases == workers.prefill_calls


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
    from decode_worker.batch_generate import generate_with_engine
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


# Preparing a request (rendering, tokenizing) runs beside the event loop.

LONG_TEXT = "The quick brown fox jumps over the lazy dog. " * 11_000  # 495 KB
ROOMY = RequestLimits(max_request_bytes=1 << 21, max_prompt_bytes=1 << 21)


def byte_level_bpe() -> HFTokenizer:
    """A real `tokenizers` tokenizer (byte-level BPE without merges: a token per
    byte), which takes about a second for LONG_TEXT."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    rust = RustTokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    return HFTokenizer(rust, bos_token_id=None, eos_token_id=None)


def test_the_event_loop_keeps_running_while_a_long_prompt_tokenizes() -> None:
    async def scenario() -> tuple[float, float]:
        relay = await make_relay(ScriptedWorkers(), tokenizer=byte_level_bpe(), limits=ROOMY)
        gaps: list[float] = []

        async def ticker() -> None:
            last = time.perf_counter()
            while True:
                await asyncio.sleep(0.005)
                now = time.perf_counter()
                gaps.append(now - last)
                last = now

        ticking = asyncio.ensure_future(ticker())
        await asyncio.sleep(0.02)
        started = time.perf_counter()
        # 495,000 tokens: refused for the context, once tokenized.
        with pytest.raises(InvalidRequest, match=r"^prompt has 495000 tokens"):
            async for _ in relay.generate(pb.GenerateRequest(prompt=LONG_TEXT), None):
                pass
        took = time.perf_counter() - started
        await asyncio.sleep(0.02)  # the ticker records the gap it is in
        ticking.cancel()
        return took, max(gaps)

    took, longest_gap = asyncio.run(scenario())
    assert took > 0.2, f"tokenizing took {took:.2f} s, too little to tell"
    # On the loop (or holding the GIL) the ticker would stall for all of it.
    assert longest_gap < took / 4, f"the loop stalled {longest_gap:.3f} s of {took:.3f} s"


def test_a_request_cancelled_while_it_tokenizes_holds_its_slot_until_the_thread_ends() -> None:
    async def scenario() -> None:
        relay = await make_relay(ScriptedWorkers(), tokenizer=byte_level_bpe(), limits=ROOMY)

        async def run() -> None:
            async for _ in relay.generate(pb.GenerateRequest(prompt=LONG_TEXT), None):
                pass

        task = asyncio.ensure_future(run())
        await asyncio.sleep(0.05)
        assert relay.stats.num_inflight == 1
        task.cancel()
        await asyncio.sleep(0.05)
        # The thread cannot be stopped: the slot stays taken until it ends.
        assert not task.done() and relay.stats.num_inflight == 1
        with pytest.raises(asyncio.CancelledError):
            await task
        assert relay.stats.num_inflight == 0

    asyncio.run(scenario())
