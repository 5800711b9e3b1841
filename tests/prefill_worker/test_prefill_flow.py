"""`PrefillFlow` without sockets: the real engine on `dummy:tiny`, the memory store,
blocks of 4 tokens, and the exact counts of what was computed, loaded, claimed and
stored after each request (hit, miss, partial hit, a waiter on an in-flight prefix,
and a cancel in each phase)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from kvstore import StoreUnavailableError
from kvstore.hashing import hash_prompt, hash_token_blocks
from kvstore.memory_store import MemoryStore
from kvstore.spec import BlockSpec
from model.generation import generate
from model.loader import LoadedModel, load_model
from model.prompt_limits import InvalidPrompt
from model.sampling_params import FinishReason, SamplingParams
from prefill_worker.engine import PrefillEngine
from prefill_worker.prefill_flow import PrefillFlow
from telemetry.metrics import ServiceMetrics
from tests.kvstore.gated_store import GatedStore

BLOCK_SIZE = 4
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
PROMPT = list(range(10, 20))  # 2 full blocks and a 2-token tail


@pytest.fixture(scope="module")
def tiny() -> LoadedModel:
    return load_model("dummy:tiny")


@pytest.fixture
def engine(tiny: LoadedModel) -> Iterator[PrefillEngine]:
    engine = PrefillEngine(tiny, token_budget=64)
    engine.start()
    yield engine
    engine.stop()


def spec_of(tiny: LoadedModel) -> BlockSpec:
    return BlockSpec.for_model("dummy:tiny", tiny.config, tiny.dtype, BLOCK_SIZE)


def make_flow(engine: PrefillEngine, store: MemoryStore) -> PrefillFlow:
    return PrefillFlow(engine, store, engine.loaded.config, ServiceMetrics("dummy:tiny", "prefill"))


def first_token(tiny: LoadedModel, prompt: list[int]) -> int:
    return generate(tiny, [prompt], GREEDY)[0].token_ids[0]


def run(flow: PrefillFlow, request_id: str, prompt: list[int], sampling=GREEDY):
    return asyncio.run(flow.run(request_id, prompt, sampling))


def test_a_miss_computes_everything_and_publishes_blocks_and_tail(tiny, engine) -> None:
    store = MemoryStore(spec_of(tiny))
    flow = make_flow(engine, store)
    out = run(flow, "a", PROMPT)
    hashes = hash_token_blocks(PROMPT, BLOCK_SIZE, store.spec.fingerprint)
    assert out.first_token_id == first_token(tiny, PROMPT)
    assert (out.num_cached_tokens, out.num_computed_tokens) == (0, 10)
    assert len(hashes) == 2
    assert (out.has_tail, out.tail_id, out.finish_reason) == (True, "a", None)
    assert store.lookup(hashes) == 2 and store.num_blocks() == 2
    prompt_hash = hash_prompt(PROMPT, BLOCK_SIZE, store.spec.fingerprint)
    assert store.get_tail("a", prompt_hash).shape[2] == 2  # the tail holds the last 2 tokens
    assert store.num_tails() == 1
    assert flow.inflight.num_blocks == 0
    assert engine.stats().num_computed_tokens_total == 10


def test_a_hit_loads_the_stored_prefix_and_computes_only_the_rest(tiny, engine) -> None:
    store = MemoryStore(spec_of(tiny))
    flow = make_flow(engine, store)
    run(flow, "a", PROMPT)
    out = run(flow, "b", PROMPT)
    assert out.first_token_id == first_token(tiny, PROMPT)
    assert (out.num_cached_tokens, out.num_computed_tokens) == (8, 2)
    assert engine.stats().num_computed_tokens_total == 10 + 2
    assert store.num_blocks() == 2  # nothing new to publish
    assert store.num_tails() == 2  # each request has its own tail


def test_a_prompt_of_whole_blocks_still_computes_its_last_block(tiny, engine) -> None:
    # The last token's logits give the first output token, so its block is computed.
    store = MemoryStore(spec_of(tiny))
    flow = make_flow(engine, store)
    prompt = PROMPT[:8]
    run(flow, "a", prompt)
    out = run(flow, "b", prompt)
    assert (out.num_cached_tokens, out.num_computed_tokens, out.has_tail) == (4, 4, False)
    assert store.num_tails() == 0


def test_a_partial_hit_loads_the_shared_blocks_only(tiny, engine) -> None:
    store = MemoryStore(spec_of(tiny))
    flow = make_flow(engine, store)
    run(flow, "a", PROMPT)
    other = PROMPT[:4] + [99] * 6  # shares block 0 only
    out = run(flow, "b", other)
    assert out.first_token_id == first_token(tiny, other)
    assert (out.num_cached_tokens, out.num_computed_tokens) == (4, 6)
    assert store.num_blocks() == 3  # block 1 of `other` is new


def test_a_salted_prompt_hits_only_the_blocks_of_its_own_salt(tiny, engine) -> None:
    store = MemoryStore(spec_of(tiny))
    flow = make_flow(engine, store)
    fingerprint = store.spec.fingerprint
    a = asyncio.run(flow.run("a", PROMPT, GREEDY, "tenant-a"))
    b = asyncio.run(flow.run("b", PROMPT, GREEDY, "tenant-b"))
    unsalted = run(flow, "c", PROMPT)
    again = asyncio.run(flow.run("d", PROMPT, GREEDY, "tenant-a"))
    assert [out.num_cached_tokens for out in (a, b, unsalted, again)] == [0, 0, 0, 8]
    assert [out.num_computed_tokens for out in (a, b, unsalted, again)] == [10, 10, 10, 2]
    assert {a.first_token_id, b.first_token_id, again.first_token_id} == {first_token(tiny, PROMPT)}
    chains = [
        hash_token_blocks(PROMPT, BLOCK_SIZE, fingerprint, salt)
        for salt in ("tenant-a", "tenant-b", None)
    ]
    assert all(store.lookup(chain) == 2 for chain in chains)
    assert store.num_blocks() == 6  # two per scope, shared by none


def test_a_waiter_on_an_in_flight_prefix_reuses_it_instead_of_computing_it(tiny, engine) -> None:
    store = MemoryStore(spec_of(tiny))
    flow = make_flow(engine, store)

    async def scenario():
        first = asyncio.ensure_future(flow.run("a", PROMPT, GREEDY))
        await asyncio.sleep(0)  # `a` claims both blocks before `b` arrives
        assert flow.inflight.num_blocks == 2
        second = asyncio.ensure_future(flow.run("b", [*PROMPT[:8], 7, 7], GREEDY))
        return await first, await second

    out_a, out_b = asyncio.run(scenario())
    assert out_a.num_cached_tokens == 0
    assert (out_b.num_cached_tokens, out_b.num_computed_tokens) == (8, 2)
    assert engine.stats().num_computed_tokens_total == 10 + 2
    assert flow.inflight.num_blocks == 0


def test_a_first_token_that_ends_the_request_stores_no_tail(tiny, engine) -> None:
    store = MemoryStore(spec_of(tiny))
    out = run(make_flow(engine, store), "a", PROMPT, SamplingParams(max_tokens=1))
    assert (out.finish_reason, out.has_tail) == (FinishReason.LENGTH, False)
    assert store.num_tails() == 0 and store.num_blocks() == 2


def test_a_prompt_over_the_context_is_refused_before_any_work(tiny, engine) -> None:
    store = MemoryStore(spec_of(tiny))
    flow = make_flow(engine, store)
    too_long = [5] * (tiny.config.max_position_embeddings - 7)
    with pytest.raises(InvalidPrompt, match="over the model's context"):
        run(flow, "a", too_long, SamplingParams(max_tokens=8))
    assert engine.stats().num_computed_tokens_total == 0 and store.num_blocks() == 0


def _cancel_at_gate(flow: PrefillFlow, store: GatedStore, prompt: list[int]) -> None:
    """Runs a request until the store's gated call, cancels it, then opens the gate
    and waits for the threads the request left behind."""

    async def scenario():
        task = asyncio.ensure_future(flow.run("a", prompt, GREEDY))
        while not store.entered.is_set():
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert flow.inflight.num_blocks == 0  # claims end with the request
        store.open()

    asyncio.run(scenario())
    assert flow.handoff.wait_idle(10)


def test_a_cancel_while_waiting_for_an_in_flight_prefix_leaves_the_owner_alone(
    tiny, engine
) -> None:
    store = GatedStore(spec_of(tiny), gated="lookup")
    flow = make_flow(engine, store)

    async def scenario():
        owner = asyncio.ensure_future(flow.run("a", PROMPT, GREEDY))
        while not store.entered.is_set():  # `a` claimed its blocks and is looking up
            await asyncio.sleep(0.005)
        waiter = asyncio.ensure_future(flow.run("b", PROMPT, GREEDY))
        await asyncio.sleep(0.05)
        assert not waiter.done()  # waiting for `a`'s blocks
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        store.open()
        return await owner

    out = asyncio.run(scenario())
    assert out.num_computed_tokens == 10
    assert engine.stats().num_finished_requests_total == 1
    assert flow.inflight.num_blocks == 0 and store.num_tails() == 1


def test_a_cancel_during_the_lookup_releases_the_claim_and_computes_nothing(tiny, engine) -> None:
    store = GatedStore(spec_of(tiny), gated="lookup")
    flow = make_flow(engine, store)
    _cancel_at_gate(flow, store, PROMPT)
    assert engine.stats().num_computed_tokens_total == 0
    assert store.num_blocks() == 0 and store.num_tails() == 0


def test_a_cancel_while_the_engine_runs_drops_the_job(tiny) -> None:
    engine = PrefillEngine(tiny, token_budget=64)  # not started: the job stays queued
    store = MemoryStore(spec_of(tiny))
    flow = make_flow(engine, store)

    async def scenario():
        task = asyncio.ensure_future(flow.run("a", PROMPT, GREEDY))
        while engine.stats().num_waiting == 0:
            await asyncio.sleep(0.005)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    engine.start()
    engine.stop()  # the engine thread saw the cancelled job before it stopped
    stats = engine.stats()
    assert (stats.num_running, stats.num_computed_tokens_total) == (0, 0)
    assert flow.inflight.num_blocks == 0
    assert store.num_blocks() == 0 and store.num_tails() == 0


def test_a_cancel_during_the_tail_put_deletes_the_tail_once_it_is_written(tiny, engine) -> None:
    store = GatedStore(spec_of(tiny), gated="put_tail")
    flow = make_flow(engine, store)
    _cancel_at_gate(flow, store, PROMPT)
    assert store.num_blocks() == 2  # the shared blocks stay for others
    assert store.num_tails() == 0  # the tail no decode worker will take is gone


def test_a_cancel_during_the_block_put_deletes_the_tail_too(tiny, engine) -> None:
    store = GatedStore(spec_of(tiny), gated="put")
    flow = make_flow(engine, store)
    _cancel_at_gate(flow, store, PROMPT)
    assert store.num_blocks() == 2 and store.num_tails() == 0


@pytest.mark.parametrize("failing", ["put", "put_tail", "lookup"])
def test_a_store_that_fails_still_gives_the_first_token_and_leaves_no_tail(
    tiny, engine, failing
) -> None:
    store = GatedStore(spec_of(tiny), gated=failing, failure=StoreUnavailableError("down"))
    store.open()
    flow = make_flow(engine, store)
    outcome = run(flow, "a", PROMPT)
    assert outcome.first_token_id == first_token(tiny, PROMPT)
    assert outcome.num_computed_tokens == len(PROMPT)
    # A failed publish stores no tail to hand on; a failed lookup is only a miss.
    assert outcome.has_tail == (failing == "lookup")
    assert flow.num_store_failures_total == (failing != "lookup")
    assert flow.num_active == 0 and flow.inflight.num_blocks == 0
