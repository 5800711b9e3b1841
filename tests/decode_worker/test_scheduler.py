"""Scheduler on tiny pools (blocks of 4 tokens): exact block ids, slots, preemption order."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from decode_worker.block_pool import BlockPool, BlockPoolConfig
from decode_worker.scheduler import (
    FREED_BLOCK,
    RequestTooLargeError,
    Scheduler,
    SchedulerConfig,
)
from decode_worker.sequence import SequenceRequest, SequenceStatus
from kvstore.hashing import hash_block
from model.sampling_params import FinishReason

SEED = bytes(16)
BLOCK_SIZE = 4


def chain_hash(parent: bytes | None, token_ids) -> bytes:
    return hash_block(parent or SEED, token_ids)


def make_scheduler(num_blocks: int = 12, window: int | None = None, **config) -> Scheduler:
    pool = BlockPool(BlockPoolConfig(num_blocks=num_blocks, block_size=BLOCK_SIZE, head_dim=8))
    config.setdefault("watermark", 0.0)
    return Scheduler(SchedulerConfig(**config), pool, chain_hash, window)


def request(
    request_id: str, num_prompt_tokens: int, max_new_tokens: int = 8, first_token_id=100, **kwargs
):
    prompt = tuple(range(first_token_id, first_token_id + num_prompt_tokens))
    return SequenceRequest(request_id, prompt, max_new_tokens=max_new_tokens, **kwargs)


def assert_drained(scheduler: Scheduler) -> None:
    """Abort whatever is left; the pool must then be whole and entirely free."""
    for request_id in list(scheduler._sequences):
        scheduler.abort(request_id)
    scheduler.pool.check_integrity()
    assert scheduler.pool.num_free_blocks == scheduler.pool.num_blocks
    assert not scheduler.has_unfinished()


def test_prefill_then_decode_grows_block_by_block() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(request("a", 6, max_new_tokens=5))
    out = scheduler.schedule()
    (prefill,) = out.prefills
    assert prefill.token_ids == (100, 101, 102, 103, 104, 105)
    assert (prefill.start_pos, prefill.block_table) == (0, (0, 1))
    assert prefill.slot_mapping == (0, 1, 2, 3, 4, 5) and prefill.is_sampled
    assert scheduler.update({"a": 7}) == []
    slots, tables = [], []
    for token in (8, 9, 10):
        (decode,) = scheduler.schedule().decodes
        slots.append(decode.slot_mapping)
        tables.append(decode.block_table)
        assert decode.context_len == decode.start_pos + 1
        scheduler.update({"a": token})
    assert slots == [(6,), (7,), (8,)]
    assert tables == [(0, 1), (0, 1), (0, 1, 2)]  # block 2 taken when position 8 arrived
    (decode,) = scheduler.schedule().decodes
    (finished,) = scheduler.update({"a": 11})
    assert finished.finish_reason is FinishReason.LENGTH
    assert finished.output_token_ids == [7, 8, 9, 10, 11]
    # 10 tokens computed: blocks 0 and 1 were full and stay cached, block 2 is not.
    assert scheduler.pool.num_cached_free_blocks == 2
    assert_drained(scheduler)


def test_long_prompt_is_chunked_by_the_token_budget() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4)
    scheduler.add_request(request("a", 10))
    scheduler.add_request(request("b", 3))
    chunks = []
    for _ in range(3):
        out = scheduler.schedule()
        chunks.append(
            [(s.request_id, s.start_pos, s.num_tokens, s.is_sampled) for s in out.prefills]
        )
        chunks[-1] += [(s.request_id, s.start_pos, s.num_tokens, s.is_sampled) for s in out.decodes]
        scheduler.update({s.request_id: 1 for s in out.prefills + out.decodes if s.is_sampled})
    assert chunks == [
        [("a", 0, 4, False)],
        [("a", 4, 4, False)],
        [("a", 8, 2, True), ("b", 0, 2, False)],
    ]
    assert scheduler.get("a").block_ids == [0, 1, 2] and scheduler.get("b").block_ids == [3]
    assert_drained(scheduler)


def test_resident_prefix_blocks_are_shared_by_hash() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(request("a", 9))
    scheduler.schedule()
    scheduler.update({"a": 1})
    scheduler.add_request(request("b", 10))  # same first 9 tokens, one more
    out = scheduler.schedule()
    (prefill,) = out.prefills
    assert prefill.request_id == "b"
    assert prefill.block_table == (0, 1, 3) and prefill.start_pos == 8
    assert prefill.token_ids == (108, 109)
    assert [scheduler.pool.ref_count(b) for b in (0, 1, 2, 3)] == [2, 2, 1, 1]
    scheduler.update({"a": 2, "b": 1})
    scheduler.abort("a")
    scheduler.abort("b")
    # An identical 8-token prompt reuses only block 0: its last token must be computed.
    scheduler.add_request(request("c", 8))
    (prefill,) = scheduler.schedule().prefills
    assert prefill.block_table == (0, 4) and prefill.start_pos == 4
    assert_drained(scheduler)


def test_prefix_caching_off_computes_a_resident_prefix_again() -> None:
    scheduler = make_scheduler(enable_prefix_caching=False)
    scheduler.add_request(request("a", 9))
    scheduler.schedule()
    scheduler.update({"a": 1})
    scheduler.add_request(request("b", 10))  # same first 9 tokens
    (prefill,) = scheduler.schedule().prefills
    assert (prefill.start_pos, prefill.block_table) == (0, (3, 4, 5))
    assert len(prefill.token_ids) == 10
    assert_drained(scheduler)


def test_gap_before_provided_kv_means_recompute() -> None:
    """Provided K/V starting at block 2 is unusable when blocks 0-1 are not resident."""
    scheduler = make_scheduler()
    prompt = tuple(range(100, 110))
    scheduler.add_request(
        SequenceRequest(
            "a",
            prompt,
            output_token_ids=(55,),
            max_new_tokens=4,
            num_provided_tokens=10,
            provided_start_block=2,
        )
    )
    out = scheduler.schedule()
    assert out.kv_fills == ()
    (prefill,) = out.prefills
    assert (prefill.start_pos, len(prefill.token_ids)) == (0, 11)
    assert_drained(scheduler)


def test_provided_kv_is_listed_for_the_caller_to_fill() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(request("warm", 5))
    scheduler.schedule()
    scheduler.update({"warm": 1})
    scheduler.abort(
        "warm"
    )  # block 0 stays resident (cached), block 1 joins the back of the free queue
    prompt = tuple(range(100, 110))
    scheduler.add_request(
        SequenceRequest(
            "a", prompt, output_token_ids=(55,), max_new_tokens=4, num_provided_tokens=10
        )
    )
    out = scheduler.schedule()
    assert [(f.block_id, f.logical_block_idx, f.num_tokens) for f in out.kv_fills] == [
        (2, 1, 4),
        (3, 2, 2),
    ]
    (decode,) = out.decodes  # the prefill worker's first token is decoded straight away
    assert (decode.token_ids, decode.start_pos, decode.block_table) == ((55,), 10, (0, 2, 3))
    assert decode.slot_mapping == (3 * 4 + 2,)
    assert scheduler.pool.block_hash(2) is not None  # provided full block now shareable
    scheduler.update({"a": 56})
    assert scheduler.get("a").num_computed_tokens == 11
    assert_drained(scheduler)


def test_admission_keeps_the_watermark_and_is_fifo() -> None:
    scheduler = make_scheduler(num_blocks=12, watermark=0.1)  # 1 block held back
    for request_id, num_tokens in (("a", 23), ("b", 19), ("c", 1), ("d", 1)):
        scheduler.add_request(request(request_id, num_tokens, max_new_tokens=2))
    out = scheduler.schedule()
    assert [s.request_id for s in out.prefills] == ["a", "b"]
    assert scheduler.num_waiting == 2 and scheduler.pool.num_free_blocks == 1
    scheduler.update({"a": 1, "b": 1})
    scheduler.schedule()
    (finished_a, finished_b) = scheduler.update({"a": 2, "b": 2})
    assert (finished_a.request_id, finished_b.request_id) == ("a", "b")
    out = scheduler.schedule()
    assert [s.request_id for s in out.decodes] == ["c", "d"]
    assert_drained(scheduler)


def test_preemption_takes_the_newest_and_resumes_it_first() -> None:
    scheduler = make_scheduler(num_blocks=6)
    for first_token_id, request_id in enumerate(("a", "b", "c")):
        # Distinct prompts, so no block is shared by hash.
        scheduler.add_request(request(request_id, 8, 10, first_token_id=10 * first_token_id))
    out = scheduler.schedule()
    assert [s.block_table for s in out.prefills] == [(0, 1), (2, 3), (4, 5)]
    scheduler.update({"a": 1, "b": 1, "c": 1})
    scheduler.add_request(request("d", 1))
    out = scheduler.schedule()  # every decode needs a 3rd block; none is free
    assert out.preempted_request_ids == ("c",)
    # c's full blocks went to the cached queue last-first, and are evicted in that order.
    assert [(s.request_id, s.block_table) for s in out.decodes] == [
        ("a", (0, 1, 5)),
        ("b", (2, 3, 4)),
    ]
    assert not out.prefills  # no admission in a step that preempted
    assert [s.request_id for s in scheduler._waiting] == ["c", "d"]
    c = scheduler.get("c")
    assert (c.status, c.num_computed_tokens, c.block_ids) == (SequenceStatus.WAITING, 0, [])
    scheduler.update({"a": 2, "b": 2})
    scheduler.abort("b")
    out = scheduler.schedule()
    (prefill,) = out.prefills  # c comes back before d and recomputes all 9 tokens
    assert (prefill.request_id, prefill.start_pos, prefill.num_tokens) == ("c", 0, 9)
    assert prefill.token_ids[-1] == 1 and prefill.block_table == (4, 3, 2)
    assert_drained(scheduler)


def test_newest_sequence_preempts_itself_when_it_alone_needs_a_block() -> None:
    scheduler = make_scheduler(num_blocks=3)
    scheduler.add_request(request("a", 5, max_new_tokens=3))
    scheduler.add_request(request("b", 4, max_new_tokens=3, first_token_id=0))
    scheduler.schedule()
    scheduler.update({"a": 1, "b": 1})
    out = scheduler.schedule()
    assert out.preempted_request_ids == ("b",)
    assert [s.request_id for s in out.decodes] == ["a"]
    scheduler.update({"a": 2})
    assert scheduler.schedule().preempted_request_ids == ()
    (finished,) = scheduler.update({"a": 3})
    assert finished.request_id == "a"
    # b's full first block stayed cached under its hash: only its last token is recomputed.
    (decode,) = scheduler.schedule().decodes
    assert (decode.request_id, decode.start_pos, decode.block_table) == ("b", 4, (2, 1))
    assert_drained(scheduler)


def test_request_too_large_for_the_pool_is_rejected() -> None:
    scheduler = make_scheduler(num_blocks=12)
    with pytest.raises(
        RequestTooLargeError, match="need 13 blocks of 4 tokens, the pool admits at most 12"
    ):
        scheduler.add_request(request("big", 40, max_new_tokens=10))
    scheduler.add_request(request("fits", 40, max_new_tokens=9))  # 48 KV tokens: 12 blocks
    assert scheduler.num_waiting == 1
    with pytest.raises(ValueError, match="already scheduled"):
        scheduler.add_request(request("fits", 1))
    assert_drained(scheduler)


def test_stop_token_and_external_finish() -> None:
    scheduler = make_scheduler()
    scheduler.add_request(request("a", 3, stop_token_ids=frozenset({2})))
    scheduler.add_request(request("b", 3))
    scheduler.schedule()
    (finished,) = scheduler.update({"a": 2, "b": 5})
    assert (finished.request_id, finished.finish_reason) == ("a", FinishReason.STOP)
    assert scheduler.finish("b", FinishReason.STOP)  # the router matched a stop string
    assert not scheduler.finish("b", FinishReason.STOP)
    assert_drained(scheduler)


def test_abort_in_every_state_frees_blocks_once() -> None:
    scheduler = make_scheduler(num_blocks=4, max_num_seqs=1)
    scheduler.add_request(request("running", 4))
    scheduler.add_request(request("waiting", 4))
    scheduler.add_request(request("in_flight", 1))
    assert not scheduler.abort("unknown")
    scheduler.schedule()
    assert scheduler.num_running == 1 and scheduler.num_waiting == 2  # max_num_seqs=1
    assert scheduler.abort("waiting")
    scheduler.update({"running": 1})
    assert scheduler.abort("running")
    assert scheduler.pool.num_free_blocks == 4
    out = scheduler.schedule()
    assert [s.request_id for s in out.decodes] == ["in_flight"]
    assert scheduler.abort("in_flight")  # between schedule() and update()
    assert scheduler.update({}) == []
    assert not scheduler.abort("in_flight")
    scheduler.pool.check_integrity()
    assert scheduler.pool.num_free_blocks == 4
    assert_drained(scheduler)


def test_config_and_request_validation() -> None:
    with pytest.raises(ValueError, match="watermark must be in"):
        SchedulerConfig(watermark=1.0)
    with pytest.raises(ValueError, match="max_num_batched_tokens must be positive"):
        SchedulerConfig(max_num_batched_tokens=0)
    with pytest.raises(ValueError, match="num_provided_tokens 3 must be in \\[0, 2\\]"):
        SequenceRequest("r", (1, 2, 3), num_provided_tokens=3)
    with pytest.raises(ValueError, match="leaves nothing to generate"):
        SequenceRequest("r", (1,), output_token_ids=(2,), max_new_tokens=1)


def test_random_workload_keeps_the_pool_consistent_and_finishes_everyone() -> None:
    """Random arrivals, shared prefixes, chunking, preemption and aborts on a pool too
    small for the load: every step keeps the pool consistent, every request ends."""
    rng = random.Random(0)
    scheduler = make_scheduler(num_blocks=12, max_num_batched_tokens=8, watermark=0.1)
    reasons: dict[str, FinishReason] = {}
    num_preemptions = num_added = 0
    for step in range(400):
        if step < 120 and rng.random() < 0.3:
            request_id = f"r{step}"
            num_added += 1
            scheduler.add_request(
                request(request_id, rng.randint(1, 14), rng.randint(1, 12), rng.choice((0, 100)))
            )
        if scheduler._sequences and rng.random() < 0.03:
            victim = rng.choice(sorted(scheduler._sequences))
            scheduler.abort(victim)
            reasons[victim] = FinishReason.ABORT
        out = scheduler.schedule()
        num_preemptions += len(out.preempted_request_ids)
        sampled = {s.request_id: rng.randint(0, 50) for s in out.prefills + out.decodes}
        for seq in scheduler.update(sampled):
            reasons[seq.request_id] = seq.finish_reason
        scheduler.pool.check_integrity()
        holders = Counter(b for s in scheduler._running for b in s.block_ids)
        ref_counts = Counter(
            {b: scheduler.pool.ref_count(b) for b in range(12) if scheduler.pool.ref_count(b)}
        )
        assert holders == ref_counts, f"step {step}: ref counts differ from block tables"
        assert all(not s.block_ids for s in scheduler._waiting), f"step {step}"
    assert not scheduler.has_unfinished(), "a request starved or deadlocked"
    assert num_added > 20 and len(reasons) == num_added
    assert num_preemptions > 0  # the pool really was under pressure
    assert_drained(scheduler)


def test_a_window_frees_the_blocks_no_later_token_sees_and_keeps_their_hashes() -> None:
    # Window 6 over blocks of 4: the token at position p sees p-5..p, so block i is
    # freed once the next position reaches 4 * (i + 1) + 5.
    scheduler = make_scheduler(num_blocks=6, window=6)
    scheduler.add_request(request("a", 10, max_new_tokens=13))
    (prefill,) = scheduler.schedule().prefills
    assert prefill.block_table == (0, 1, 2)
    scheduler.update({"a": 7})  # 10 computed: the next token (10) sees 5..10
    seq = scheduler.get("a")
    assert seq.block_ids == [FREED_BLOCK, 1, 2] and scheduler.pool.num_free_blocks == 4
    tables, num_used = [], []
    for token in range(20, 31):
        (decode,) = scheduler.schedule().decodes
        tables.append(decode.block_table)
        scheduler.update({"a": token})
        num_used.append(scheduler.pool.num_used_blocks)
    # A freed block's entry reads 0 (never attended); at most ceil(6/4) + 1 = 3 held.
    assert tables[0] == (0, 1, 2) and tables[2] == (0, 1, 2, 3) and tables[3] == (0, 0, 2, 3)
    assert tables[-1] == (0, 0, 0, 3, 4, 5)
    assert max(num_used) <= 3
    assert seq.block_ids[:4] == [FREED_BLOCK] * 4 and seq.num_freed_blocks == 4
    # The freed blocks keep their hashes: the same prompt reuses its first two.
    scheduler.add_request(request("b", 10, max_new_tokens=2))
    scheduler.schedule()
    assert scheduler.get("b").num_computed_tokens == 8
    scheduler.update({"a": 99, "b": 1})
    assert_drained(scheduler)


def test_without_a_window_no_block_is_freed_early() -> None:
    scheduler = make_scheduler(num_blocks=6)
    scheduler.add_request(request("a", 10, max_new_tokens=8))
    scheduler.schedule()
    scheduler.update({"a": 7})
    for token in range(20, 25):
        scheduler.schedule()
        scheduler.update({"a": token})
    assert FREED_BLOCK not in scheduler.get("a").block_ids
    assert scheduler.pool.num_used_blocks == 4
    assert_drained(scheduler)


def test_with_a_window_blocks_before_it_are_neither_provided_nor_allocated() -> None:
    # Window 6 over blocks of 4, 14 prompt tokens and the prefill worker's first
    # token: the token at position 14 sees 9..14, so blocks 0 and 1 are never read.
    # The caller provides blocks 2 and 3 (the tail of 2) and the gap before block 2
    # is no gap: those blocks take no place in the pool.
    scheduler = make_scheduler(num_blocks=6, window=6)
    prompt = tuple(range(100, 114))
    scheduler.add_request(
        SequenceRequest(
            "a",
            prompt,
            output_token_ids=(55,),
            max_new_tokens=4,
            num_provided_tokens=14,
            provided_start_block=2,
        )
    )
    out = scheduler.schedule()
    assert [(f.block_id, f.logical_block_idx, f.num_tokens) for f in out.kv_fills] == [
        (0, 2, 4),
        (1, 3, 2),
    ]
    (decode,) = out.decodes
    assert (decode.start_pos, decode.block_table) == (14, (0, 0, 0, 1))
    seq = scheduler.get("a")
    assert seq.block_ids == [FREED_BLOCK, FREED_BLOCK, 0, 1]
    assert scheduler.pool.num_used_blocks == 2
    scheduler.update({"a": 56})
    assert seq.num_computed_tokens == 15
    assert_drained(scheduler)


def test_with_a_window_too_little_provided_kv_means_the_whole_prompt() -> None:
    # Blocks 2.. provided but only 9 tokens of them: token 9 would need positions 4..9,
    # block 1, which nobody holds: recompute from the start, every block allocated.
    scheduler = make_scheduler(num_blocks=6, window=6)
    prompt = tuple(range(100, 114))
    scheduler.add_request(
        SequenceRequest(
            "a",
            prompt,
            output_token_ids=(55,),
            max_new_tokens=4,
            num_provided_tokens=9,
            provided_start_block=2,
        )
    )
    out = scheduler.schedule()
    assert out.kv_fills == ()
    (prefill,) = out.prefills
    assert (prefill.start_pos, len(prefill.token_ids)) == (0, 15)
    assert FREED_BLOCK not in scheduler.get("a").block_ids
    assert_drained(scheduler)
