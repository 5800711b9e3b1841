"""Decode admission and the decode flow without sockets: a real engine loop on
`dummy:tiny` with a pool of 16 blocks of 4 tokens, the memory store, and a prefill
flow that publishes each prompt's K/V as a prefill worker would. After each
request the exact block ids of the prompt in the pool, what was fetched, what is
left in the store and in the pool are asserted, and every answer is checked
against the reference generation loop."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import pytest
import torch

from decode_worker.admission import DecodeAdmission, DecodeCall, PrefillHandoff
from decode_worker.block_publisher import BlockPublisher
from decode_worker.decode_flow import DecodeFailed, DecodeFlow
from decode_worker.engine import DecodeEngine, EngineRequest
from decode_worker.engine_config import EngineConfig
from decode_worker.engine_loop import EngineLoop
from kvstore.hashing import hash_token_blocks
from kvstore.memory_store import MemoryStore
from kvstore.spec import BlockSpec
from model.generation import generate
from model.loader import LoadedModel, load_model
from model.prompt_limits import InvalidPrompt
from model.sampling_params import FinishReason, SamplingParams
from prefill_worker.engine import PrefillEngine
from prefill_worker.prefill_flow import PrefillFlow
from protos import workers_pb2 as wpb
from rpc.limits import Overloaded
from telemetry.metrics import ServiceMetrics
from tests.kvstore.gated_store import GatedStore

BLOCK_SIZE = 4
NUM_BLOCKS = 16
GREEDY = SamplingParams(max_tokens=6, ignore_eos=True)
PROMPT = list(range(10, 20))  # blocks [10..13] [14..17], tail [18, 19]


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("dummy:tiny")


@pytest.fixture(scope="module")
def spec(tiny: LoadedModel) -> BlockSpec:
    return BlockSpec.for_model("dummy:tiny", tiny.config, tiny.dtype, BLOCK_SIZE)


@pytest.fixture
def prefill_engine(tiny: LoadedModel) -> Iterator[PrefillEngine]:
    engine = PrefillEngine(tiny, token_budget=64)
    engine.start()
    yield engine
    engine.stop()


@pytest.fixture
def loop(tiny: LoadedModel, spec: BlockSpec) -> Iterator[EngineLoop]:
    config = EngineConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    loop = EngineLoop(DecodeEngine(tiny, config, spec.fingerprint))
    loop.start()
    yield loop
    loop.stop()


class Worker:
    """A prefill flow and a decode flow sharing one store, as a cluster would."""

    def __init__(self, tiny, store, prefill_engine, loop) -> None:
        metrics = ServiceMetrics("dummy:tiny", "decode")
        self.store = store
        self.loop = loop
        self.pool = loop.engine.pool
        self.prefill = PrefillFlow(prefill_engine, store, tiny.config, metrics)
        admission = DecodeAdmission(loop, store, tiny.config, metrics)
        self.decode = DecodeFlow(loop, admission, metrics)

    async def call(
        self, request_id: str, prompt: list[int], cache_salt: str | None = None
    ) -> DecodeCall:
        out = await self.prefill.run(request_id, prompt, GREEDY, cache_salt)
        return DecodeCall(
            request_id,
            prompt,
            GREEDY,
            [out.first_token_id],
            PrefillHandoff(out.tail_id),
            cache_salt=cache_salt,
        )

    async def generate(self, call: DecodeCall) -> tuple[list[int], list]:
        """The tokens after the prefill worker's, and the batches they came in."""
        batches = [batch async for batch in self.decode.run(call)]
        return [t for b in batches for t in b.token_ids], batches


@pytest.fixture
def worker(tiny, spec, prefill_engine, loop) -> Worker:
    return Worker(tiny, MemoryStore(spec), prefill_engine, loop)


def hashes_of(call: DecodeCall) -> list[bytes]:
    """The prompt's full blocks, hashed as every worker of the test hashes them
    (with the call's cache salt)."""
    fingerprint = BlockSpec.for_model(
        "dummy:tiny", load_model("dummy:tiny").config, torch.float32, BLOCK_SIZE
    ).fingerprint
    return hash_token_blocks(call.prompt_token_ids, BLOCK_SIZE, fingerprint, call.cache_salt)


def found_at_admission(batches: list) -> tuple[int, int]:
    """(prompt blocks resident in the pool, blocks fetched) when the request was admitted."""
    return batches[0].num_resident_blocks, batches[0].num_fetched_blocks


def expected(tiny: LoadedModel, prompt: list[int]) -> list[int]:
    return generate(tiny, [prompt], GREEDY)[0].token_ids


def wait_idle(loop: EngineLoop) -> None:
    """Until the engine thread has applied the aborts sent to it."""
    for _ in range(200):
        stats = loop.stats()
        if stats.num_running == stats.num_waiting == 0:
            return
        asyncio.run(asyncio.sleep(0.01))
    raise AssertionError(f"engine still busy: {loop.stats()}")


def test_none_resident_fetches_every_block_and_the_tail(tiny, worker) -> None:
    async def scenario():
        call = await worker.call("a", PROMPT)
        return call, await worker.generate(call)

    call, (tokens, batches) = asyncio.run(scenario())
    assert [call.generated_token_ids[0], *tokens] == expected(tiny, PROMPT)
    assert (batches[0].num_resident_blocks, batches[0].num_fetched_blocks) == (0, 3)
    assert batches[-1].finish_reason is FinishReason.LENGTH
    # The fetched blocks went to the first free blocks, and stay cached by hash.
    assert [worker.pool.cached_block(h) for h in hashes_of(call)] == [0, 1]
    assert worker.pool.num_used_blocks == 0
    assert worker.store.num_tails() == 0  # read once, then deleted


def test_all_resident_fetches_only_the_tail(tiny, worker) -> None:
    async def scenario():
        await worker.generate(await worker.call("a", PROMPT))
        call = await worker.call("b", PROMPT)
        return call, await worker.generate(call)

    call, (tokens, batches) = asyncio.run(scenario())
    assert [call.generated_token_ids[0], *tokens] == expected(tiny, PROMPT)
    assert (batches[0].num_resident_blocks, batches[0].num_fetched_blocks) == (2, 1)
    assert [worker.pool.cached_block(h) for h in hashes_of(call)] == [0, 1]
    assert worker.pool.num_used_blocks == 0 and worker.store.num_tails() == 0


def test_some_resident_fetches_the_rest(tiny, worker) -> None:
    other = [*PROMPT[:4], 40, 41, 42, 43, 44, 45]

    async def scenario():
        await worker.generate(await worker.call("a", PROMPT))
        call = await worker.call("b", other)
        return call, await worker.generate(call)

    call, (tokens, batches) = asyncio.run(scenario())
    assert [call.generated_token_ids[0], *tokens] == expected(tiny, other)
    assert (batches[0].num_resident_blocks, batches[0].num_fetched_blocks) == (1, 2)
    assert worker.pool.cached_block(hashes_of(call)[0]) == 0  # shared with `a`
    assert worker.pool.num_used_blocks == 0


def test_a_salted_prompt_shares_blocks_only_within_its_salt(tiny, worker) -> None:
    async def scenario():
        a = await worker.call("a", PROMPT, "tenant-a")
        a_batches = (await worker.generate(a))[1]
        b = await worker.call("b", PROMPT, "tenant-b")
        b_batches = (await worker.generate(b))[1]
        again = await worker.call("c", PROMPT, "tenant-a")
        return (a, a_batches), (b, b_batches), (again, (await worker.generate(again))[1])

    (a, a_batches), (b, b_batches), (again, again_batches) = asyncio.run(scenario())
    assert found_at_admission(a_batches) == (0, 3)
    # tenant-b finds nothing of tenant-a's, resident or stored: it fetches what its
    # own prefill stored (2 blocks and the tail) into blocks of its own.
    assert found_at_admission(b_batches) == (0, 3)
    assert found_at_admission(again_batches) == (2, 1)  # tenant-a's blocks, resident since `a`
    assert [worker.pool.cached_block(h) for h in hashes_of(a)] == [0, 1]
    assert [worker.pool.cached_block(h) for h in hashes_of(b)] == [4, 5]
    assert hashes_of(again) == hashes_of(a)
    assert set(hashes_of(a)).isdisjoint(hashes_of(b))
    assert worker.store.num_blocks() == 4  # two per salt, none unsalted
    assert worker.store.lookup(hashes_of(DecodeCall("x", PROMPT, GREEDY))) == 0
    for call, batches in ((a, a_batches), (b, b_batches), (again, again_batches)):
        tokens = [t for batch in batches for t in batch.token_ids]
        assert [call.generated_token_ids[0], *tokens] == expected(tiny, PROMPT)
    assert worker.pool.num_used_blocks == 0 and worker.store.num_tails() == 0


def test_the_blocks_a_salted_request_computes_are_published_under_its_salt(
    tiny, spec, worker
) -> None:
    store = MemoryStore(spec)
    publisher = BlockPublisher(store)
    config = EngineConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    loop = EngineLoop(DecodeEngine(tiny, config, spec.fingerprint, publisher.submit))
    loop.start()
    try:
        decoder = Worker(tiny, store, worker.prefill.engine, loop)
        call = DecodeCall("a", PROMPT, GREEDY, cache_salt="tenant-a")  # prefilled here
        tokens, _ = asyncio.run(decoder.generate(call))
        assert publisher.flush(10)
    finally:
        loop.stop()
        publisher.stop()
    assert tokens == expected(tiny, PROMPT)
    # 10 prompt + 6 generated tokens; the last is never fed back: 3 full blocks.
    sequence = [*PROMPT, *tokens]
    salted = hash_token_blocks(sequence, BLOCK_SIZE, spec.fingerprint, "tenant-a")
    assert store.lookup(salted) == 3 and store.num_blocks() == 3
    assert store.lookup(hash_token_blocks(sequence, BLOCK_SIZE, spec.fingerprint)) == 0


# A worker trusts no caller: it fetches and files K/V only under hashes it computes
# from the tokens it is given, and checks every token id against the vocabulary.


def test_a_caller_naming_another_prompts_tail_cannot_file_it_under_its_prompt(tiny, worker) -> None:
    # `forged` shares `PROMPT`'s full blocks but not its tail: a caller that names
    # PROMPT's tail for it would, if the tail were taken, have the K/V of tokens
    # [18, 19] filed (and reused, and published) under forged's hash chain.
    forged = [*PROMPT[:8], 50, 51]

    async def scenario():
        victim = await worker.call("a", PROMPT)  # stores 2 blocks and the tail "a"
        first_token = expected(tiny, forged)[0]
        call = DecodeCall("x", forged, GREEDY, [first_token], victim.prefill)
        return call, await worker.generate(call)

    call, (tokens, batches) = asyncio.run(scenario())
    assert [call.generated_token_ids[0], *tokens] == expected(tiny, forged)
    # The 2 shared blocks were fetched by forged's own hashes; the tail was refused
    # (a counted corrupt miss, deleted all the same) and tokens 8, 9 computed here.
    assert found_at_admission(batches) == (0, 2)
    assert batches[0].num_reused_tokens == 8
    assert worker.store.stats().corrupt_blocks == 1 and worker.store.num_tails() == 0
    # What the pool filed: forged's blocks 0, 1 (fetched) and 2 (tokens 8..11: 50, 51
    # and two generated, all computed here), under forged's chain only.
    sequence = [*forged, call.generated_token_ids[0], *tokens]
    chain = hash_token_blocks(sequence, BLOCK_SIZE, worker.store.spec.fingerprint)
    assert [worker.pool.cached_block(h) for h in chain[:3]] == [0, 1, 2]
    assert worker.pool.num_used_blocks == 0


def test_a_prefilled_call_with_a_first_token_outside_the_vocabulary_is_refused(
    tiny, worker
) -> None:
    vocab_size = tiny.config.vocab_size
    call = DecodeCall("x", PROMPT, GREEDY, [vocab_size], PrefillHandoff(""))
    with pytest.raises(InvalidPrompt, match=rf"^prefill\.first_token_id is {vocab_size}; token"):
        asyncio.run(worker.generate(call))
    assert worker.pool.num_used_blocks == 0 and worker.loop.stats().num_waiting == 0


@pytest.mark.parametrize(
    ("prompt", "generated", "message"),
    [
        ([*PROMPT[:3], 1000, *PROMPT[4:]], [], r"^prompt_token_ids\[3\] is 1000; token"),
        (PROMPT, [65, 2**31], r"^generated_token_ids\[1\] is 2147483648; token"),
    ],
    ids=["prompt", "resumed"],
)
def test_token_ids_outside_the_vocabulary_are_refused_naming_the_field(
    worker, prompt, generated, message
) -> None:
    with pytest.raises(InvalidPrompt, match=message):
        asyncio.run(worker.generate(DecodeCall("x", prompt, GREEDY, generated)))
    assert worker.pool.num_used_blocks == 0 and worker.loop.stats().num_waiting == 0


def test_a_block_evicted_from_the_store_between_lookup_and_get_is_computed(
    tiny, spec, prefill_engine, loop
) -> None:
    # A store that holds two blocks: after the prefill, the second is evicted.
    store = MemoryStore(spec, budget_bytes=2 * spec.nbytes)
    worker = Worker(tiny, store, prefill_engine, loop)

    async def scenario():
        call = await worker.call("a", PROMPT)
        store.get(hashes_of(call)[:1])  # block 0 is now the most recent
        store.put([(b"\x00" * 16, store.get(hashes_of(call)[:1])[0])])
        assert store.lookup(hashes_of(call)) == 1
        return call, await worker.generate(call)

    call, (tokens, batches) = asyncio.run(scenario())
    assert [call.generated_token_ids[0], *tokens] == expected(tiny, PROMPT)
    # Block 0 came from the store; block 1 and the tail's tokens were recomputed, so
    # the tail (unusable past the gap) was still deleted.
    assert (batches[0].num_resident_blocks, batches[0].num_fetched_blocks) == (0, 1)
    assert store.num_tails() == 0 and worker.pool.num_used_blocks == 0


def test_an_abort_during_the_fetch_leaves_nothing_behind(tiny, spec, prefill_engine, loop) -> None:
    store = GatedStore(spec, gated="get")
    worker = Worker(tiny, store, prefill_engine, loop)

    async def scenario():
        call = await worker.call("a", PROMPT)
        task = asyncio.ensure_future(worker.generate(call))
        while not store.entered.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        store.open()
        while store.num_tails():  # the fetch thread goes on and deletes the tail
            await asyncio.sleep(0.005)

    asyncio.run(scenario())
    stats = loop.stats()
    assert (stats.num_waiting, stats.num_running, stats.num_used_blocks) == (0, 0, 0)
    assert stats.num_finished_requests_total == 0  # the engine never heard of it


def test_an_abort_mid_generation_frees_every_block(tiny, worker, loop) -> None:
    async def scenario():
        call = await worker.call("a", PROMPT)
        stream = worker.decode.run(call)
        first = await anext(stream)
        assert worker.pool.num_used_blocks == 3  # two prompt blocks and the tail's
        await stream.aclose()
        return first

    first = asyncio.run(scenario())
    assert first.num_fetched_blocks == 3
    wait_idle(loop)
    assert worker.pool.num_used_blocks == 0
    worker.pool.check_integrity()


def test_a_request_the_pool_can_never_hold_fails_with_the_cause(tiny, worker) -> None:
    huge = DecodeCall("a", [5] * 100, SamplingParams(max_tokens=8))  # 27 blocks > 16

    async def scenario():
        return [batch async for batch in worker.decode.run(huge)]

    with pytest.raises(DecodeFailed, match="pool admits at most") as err:
        asyncio.run(scenario())
    assert isinstance(err.value.cause, ValueError)


def test_a_sink_that_fails_costs_its_request_not_the_engine_thread(tiny, loop) -> None:
    from decode_worker.engine import EngineRequest

    def broken_sink(item) -> None:
        raise RuntimeError("Event loop is closed")

    loop.submit(EngineRequest("gone", PROMPT, GREEDY), broken_sink)
    received = []
    done = threading.Event()

    def sink(item) -> None:
        received.append(item)
        if getattr(item, "finish_reason", None) is not None:
            done.set()

    loop.submit(EngineRequest("alive", PROMPT, GREEDY), sink)
    assert done.wait(30), "the engine thread stopped serving"
    assert [o.token_id for o in received] == expected(tiny, PROMPT)
    wait_idle(loop)
    assert loop.stats().num_used_blocks == 0


@pytest.mark.parametrize(
    "sampling",
    [
        SamplingParams(max_tokens=24, ignore_eos=True),
        SamplingParams(max_tokens=24, temperature=1.0, top_k=50, seed=5, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_a_resumed_request_continues_from_the_blocks_the_failed_worker_published(
    tiny, spec, prefill_engine, sampling
) -> None:
    store = MemoryStore(spec)
    publisher = BlockPublisher(store)
    config = EngineConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE)
    first_loop = EngineLoop(DecodeEngine(tiny, config, spec.fingerprint, publisher.submit))
    second_loop = EngineLoop(DecodeEngine(tiny, config, spec.fingerprint))
    first_loop.start()
    second_loop.start()
    try:
        failing = Worker(tiny, store, prefill_engine, first_loop)
        fresh = Worker(tiny, store, prefill_engine, second_loop)

        async def scenario():
            out = await failing.prefill.run("a.p1", PROMPT, sampling)
            call = DecodeCall(
                "a.d1", PROMPT, sampling, [out.first_token_id], PrefillHandoff(out.tail_id)
            )
            sent = [out.first_token_id]
            stream = failing.decode.run(call)
            async for batch in stream:
                sent += batch.token_ids
                if len(sent) >= 15:
                    break
            await stream.aclose()  # the worker "dies" here
            assert publisher.flush(10)
            resumed = DecodeCall("a.d2", PROMPT, sampling, sent)
            batches = [b async for b in fresh.decode.run(resumed)]
            return sent, batches

        sent, batches = asyncio.run(scenario())
    finally:
        first_loop.stop()
        second_loop.stop()
        publisher.stop()
    reference = generate(tiny, [PROMPT], sampling)[0].token_ids
    assert sent + [t for b in batches for t in b.token_ids] == reference
    num_tokens = len(PROMPT) + len(sent)
    # Every full block but the last token's came from the store; only the last
    # partial block (and that token) was computed.
    assert batches[0].num_fetched_blocks == (num_tokens - 1) // BLOCK_SIZE
    assert num_tokens - batches[0].num_reused_tokens <= BLOCK_SIZE
    assert fresh.decode.counters.num_resumed_requests_total == 1
    assert fresh.decode.counters.num_resumed_computed_tokens_total <= BLOCK_SIZE


def test_past_max_queued_a_request_is_refused_before_any_work(tiny, spec, loop) -> None:
    store = GatedStore(spec, gated="get")  # holds the first request in its fetch
    metrics = ServiceMetrics("dummy:tiny", "decode")
    admission = DecodeAdmission(loop, store, tiny.config, metrics)
    flow = DecodeFlow(loop, admission, metrics, max_queued=1)

    async def scenario():
        waiting = DecodeCall("w", PROMPT, GREEDY, [1], PrefillHandoff(""))
        first = asyncio.ensure_future(anext(flow.run(waiting)))
        await asyncio.to_thread(store.entered.wait, 5)
        assert flow.num_queued == 1
        with pytest.raises(Overloaded, match="1 requests queued, its --max-queued"):
            await anext(flow.run(DecodeCall("x", PROMPT, GREEDY)))
        store.open()
        batch = await first
        assert batch.token_ids  # the waiting one went on
        first.cancel()

    asyncio.run(scenario())
    wait_idle(loop)


def test_the_watchdog_sees_a_wedged_step_and_health_follows_it(tiny, spec) -> None:
    from grpc_health.v1 import health_pb2
    from grpc_health.v1._async import HealthServicer

    from rpc.worker_server import WorkerHealth

    engine = DecodeEngine(
        tiny, EngineConfig(num_blocks=NUM_BLOCKS, block_size=BLOCK_SIZE), spec.fingerprint
    )
    wedge, run = threading.Event(), engine.runner.run

    def wedged_run(step):
        assert wedge.wait(10), "never released"
        return run(step)

    engine.runner.run = wedged_run
    loop = EngineLoop(engine)
    loop.start()
    health = HealthServicer()

    async def status(name: str = "") -> int:
        request = health_pb2.HealthCheckRequest(service=name)
        return (await health.Check(request, None)).status

    async def scenario():
        watch = WorkerHealth(health, "kvrelay.v1.DecodeWorker", lambda: loop.is_stalled(0.2), None)
        await watch.check()
        assert await status() == health_pb2.HealthCheckResponse.SERVING  # idle is fine
        outputs = []
        loop.submit(
            EngineRequest("r", PROMPT, SamplingParams(max_tokens=2, ignore_eos=True)),
            outputs.append,
        )
        await asyncio.sleep(0.4)
        await watch.check()
        assert watch.is_stalled
        assert await status() == health_pb2.HealthCheckResponse.NOT_SERVING
        assert await status("kvrelay.v1.DecodeWorker") == health_pb2.HealthCheckResponse.NOT_SERVING
        assert watch.annotate(wpb.HeartbeatRequest()).is_stalled
        wedge.set()  # it moves again: it recovers by itself
        for _ in range(100):
            if len(outputs) == 2:
                break
            await asyncio.sleep(0.02)
        await watch.check()
        assert not watch.is_stalled
        assert await status() == health_pb2.HealthCheckResponse.SERVING
        return outputs

    try:
        outputs = asyncio.run(scenario())
    finally:
        wedge.set()
        loop.stop()
    assert [o.token_id for o in outputs] == generate(
        tiny, [PROMPT], SamplingParams(max_tokens=2, ignore_eos=True)
    )[0].token_ids
