"""The Redis read path that bypasses hiredis (`RespReader`), on a real `redis-server`:
values received into tensors, corrupt values, wrong types, replies cut part-way."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import redis
import torch
from holding_proxy import HoldingProxy
from redis_server import RedisServer
from tiny_blocks import TINY_SPEC, make_block

from kvstore.codec import HEADER_LEN
from kvstore.hashing import hash_token_blocks
from kvstore.redis.store import RedisStore
from kvstore.stats import StoreStats
from kvstore.store import StoreUnavailableError

pytestmark = pytest.mark.redis

HASHES = hash_token_blocks(list(range(40)), TINY_SPEC.block_size, TINY_SPEC.fingerprint)
BLOCK_REPLY_PREFIX_LEN = len(b"$%d\r\n" % (HEADER_LEN + TINY_SPEC.nbytes))
SENTINEL = -7.0


@pytest.fixture
def proxy(own_redis: RedisServer) -> Iterator[HoldingProxy]:
    proxy = HoldingProxy(own_redis.port)
    yield proxy
    proxy.close()


def put_blocks(store: RedisStore, seeds: range) -> None:
    store.put([(HASHES[i], make_block(i)) for i in seeds])


def test_get_returns_new_tensors_with_the_stored_bytes(shared_redis: RedisServer) -> None:
    redis.Redis(port=shared_redis.port).flushall()
    store = RedisStore(shared_redis.url, TINY_SPEC)
    put_blocks(store, range(3))
    first, second = store.get(HASHES[:3]), store.get(HASHES[:3])
    for i in range(3):
        assert first[i] is not None and second[i] is not None
        assert torch.equal(first[i], make_block(i)) and torch.equal(second[i], make_block(i))
        assert first[i].data_ptr() != second[i].data_ptr()
    first[0].fill_(0.0)  # the caller owns it: writing to it changes nothing stored
    again = store.get(HASHES[:1])[0]
    assert again is not None and torch.equal(again, make_block(0))
    store.close()


def test_get_into_leaves_out_untouched_for_missing_and_corrupt_blocks(
    shared_redis: RedisServer,
) -> None:
    raw = redis.Redis(port=shared_redis.port)
    raw.flushall()
    store = RedisStore(shared_redis.url, TINY_SPEC)
    put_blocks(store, range(3))
    good = raw.get(store.block_key(HASHES[0]))
    assert good is not None
    flipped = bytearray(good)
    flipped[HEADER_LEN + 5] ^= 0x01  # one bit of the payload
    raw.set(store.block_key(HASHES[0]), bytes(flipped))
    raw.set(store.block_key(HASHES[2]), good + b"extra")  # wrong length
    out = [torch.full(TINY_SPEC.shape, SENTINEL) for _ in range(4)]

    assert store.get_into(HASHES[:4], out) == [False, True, False, False]
    assert torch.equal(out[1], make_block(1))
    for i in (0, 2, 3):
        assert bool((out[i] == SENTINEL).all()), f"out[{i}] was written"
    assert store.stats() == StoreStats(
        hits=1,
        misses=3,
        corrupt_blocks=2,
        bytes_in=3 * TINY_SPEC.nbytes,
        bytes_out=TINY_SPEC.nbytes,
    )
    store.close()


def test_get_into_a_non_contiguous_destination(shared_redis: RedisServer) -> None:
    redis.Redis(port=shared_redis.port).flushall()
    store = RedisStore(shared_redis.url, TINY_SPEC)
    put_blocks(store, range(2))
    pool = torch.zeros((2, *TINY_SPEC.shape[::-1]))  # written through transposed views
    out = [pool[i].permute(4, 3, 2, 1, 0) for i in range(2)]
    assert not out[0].is_contiguous()
    assert store.get_into(HASHES[:2], out) == [True, True]
    assert torch.equal(out[0], make_block(0)) and torch.equal(out[1], make_block(1))
    store.close()


def test_resp3_connections_read_blocks_and_nulls(shared_redis: RedisServer) -> None:
    redis.Redis(port=shared_redis.port).flushall()
    store = RedisStore(f"{shared_redis.url}?protocol=3", TINY_SPEC)
    put_blocks(store, range(1))
    blocks = store.get(HASHES[:2])
    assert blocks[0] is not None and torch.equal(blocks[0], make_block(0))
    assert blocks[1] is None
    store.close()


def test_wrong_type_under_a_block_key_fails_the_call_and_the_store_recovers(
    shared_redis: RedisServer,
) -> None:
    raw = redis.Redis(port=shared_redis.port)
    raw.flushall()
    store = RedisStore(shared_redis.url, TINY_SPEC, max_connections=1)
    put_blocks(store, range(3))
    raw.delete(store.block_key(HASHES[1]))
    raw.rpush(store.block_key(HASHES[1]), b"not a string")
    with pytest.raises(StoreUnavailableError, match="WRONGTYPE"):
        store.get(HASHES[:3])
    assert store.stats().errors == 1
    # The one connection was dropped out of step and reconnects in step.
    blocks = store.get([HASHES[0], HASHES[2]])
    assert blocks[0] is not None and torch.equal(blocks[0], make_block(0))
    assert blocks[1] is not None and torch.equal(blocks[1], make_block(2))
    store.close()


def test_redis_killed_mid_reply_fails_fast_then_recovers(
    own_redis: RedisServer, proxy: HoldingProxy
) -> None:
    store = RedisStore(proxy.url, TINY_SPEC, timeout_s=5.0)
    put_blocks(store, range(4))
    proxy.hold_after(BLOCK_REPLY_PREFIX_LEN + HEADER_LEN + 100)  # in block 0's payload
    killer = threading.Thread(target=lambda: proxy.held.wait(5) and own_redis.kill())
    killer.start()
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError, match="closed the connection"):
        store.get(HASHES[:4])
    assert time.monotonic() - start < 2.0, "a dead server must not wait for the timeout"
    killer.join()
    assert store.stats().errors == 1

    own_redis.start()
    put_blocks(store, range(2))
    blocks = store.get(HASHES[:3])
    assert blocks[0] is not None and torch.equal(blocks[0], make_block(0))
    assert blocks[1] is not None and torch.equal(blocks[1], make_block(1))
    assert blocks[2] is None
    store.close()


@pytest.mark.parametrize("cut_at", ["mid_line", "mid_payload", "second_block"])
def test_reply_frozen_part_way_times_out_and_the_connection_is_dropped(
    own_redis: RedisServer, proxy: HoldingProxy, cut_at: str
) -> None:
    timeout_s = 0.3
    store = RedisStore(proxy.url, TINY_SPEC, timeout_s=timeout_s, max_connections=1)
    put_blocks(store, range(4))
    block_reply_len = BLOCK_REPLY_PREFIX_LEN + HEADER_LEN + TINY_SPEC.nbytes + 2
    num_bytes = {"mid_line": 2, "mid_payload": block_reply_len - 50, "second_block": 400}
    proxy.hold_after(num_bytes[cut_at])
    out = [torch.full(TINY_SPEC.shape, SENTINEL) for _ in range(4)]
    start = time.monotonic()
    with pytest.raises(StoreUnavailableError):
        store.get_into(HASHES[:4], out)
    assert timeout_s - 0.05 < time.monotonic() - start < timeout_s + 1.0
    assert proxy.held.is_set()
    # Had the held connection gone back to the pool (the only connection), this
    # call would read the rest of the old reply or time out again.
    blocks = store.get(HASHES[:4])
    for i, block in enumerate(blocks):
        assert block is not None and torch.equal(block, make_block(i)), i
    store.close()


def test_with_a_secret_a_block_rewritten_without_it_is_a_counted_miss(
    shared_redis: RedisServer,
) -> None:
    """A client that can write to Redis but has no secret plants a well-formed block
    (right header, length and xxh3) under a real key: it is never returned."""
    raw = redis.Redis(port=shared_redis.port)
    raw.flushall()
    secret = b"k" * 32
    store = RedisStore(shared_redis.url, TINY_SPEC, secret=secret)
    assert store.is_authenticated
    put_blocks(store, range(2))
    planter = RedisStore(shared_redis.url, TINY_SPEC)  # no secret
    raw.set(
        store.block_key(HASHES[0]),
        planter._codec.encode_bytes(HASHES[0], torch.full(TINY_SPEC.shape, 9.0)),
    )
    got = store.get(HASHES[:2])
    assert got[0] is None and torch.equal(got[1], make_block(1))
    assert store.stats().corrupt_blocks == 1
    out = [torch.full(TINY_SPEC.shape, SENTINEL)]
    assert store.get_into(HASHES[:1], out) == [False]
    assert bool((out[0] == SENTINEL).all())
    # And the other way round: the unauthenticated store cannot read real blocks.
    assert planter.get(HASHES[1:2]) == [None]
    store.close()
    planter.close()
