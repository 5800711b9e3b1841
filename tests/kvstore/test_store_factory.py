"""`open_store`: URLs and options to backends."""

from __future__ import annotations

import pytest
from redis_server import RedisServer
from tiny_blocks import TINY_SPEC, make_block

from kvstore.factory import open_store
from kvstore.hashing import hash_token_blocks
from kvstore.local_cache import LocalCachedStore
from kvstore.memory_store import MemoryStore
from kvstore.redis.store import RedisStore

HASHES = hash_token_blocks(list(range(16)), TINY_SPEC.block_size, TINY_SPEC.fingerprint)


def test_memory_with_budget_from_the_query() -> None:
    store = open_store(f"memory://?budget_bytes={2 * TINY_SPEC.nbytes}", TINY_SPEC)
    assert isinstance(store, MemoryStore)
    store.put([(h, make_block(i)) for i, h in enumerate(HASHES[:3])])
    assert store.num_blocks() == 2
    assert store.lookup(HASHES[:3]) == 0  # block 0 was evicted first
    assert store.lookup(HASHES[1:3]) == 2


def test_keyword_options_win_over_the_query() -> None:
    store = open_store("memory://?tail_ttl_s=5", TINY_SPEC, tail_ttl_s=7.0)
    assert isinstance(store, MemoryStore)
    assert store._tails.ttl_s == 7.0


def test_local_cache_option_wraps_the_backend() -> None:
    store = open_store("memory", TINY_SPEC, local_cache_bytes=4 * TINY_SPEC.nbytes)
    assert isinstance(store, LocalCachedStore)
    assert isinstance(store.backend, MemoryStore)


@pytest.mark.redis
def test_redis_url_keeps_its_own_query(shared_redis: RedisServer) -> None:
    store = open_store(f"{shared_redis.url}/2?timeout_s=0.25&block_ttl_s=99", TINY_SPEC)
    assert isinstance(store, RedisStore)
    assert store.block_ttl_s == 99
    assert store._pool.connection_kwargs["socket_timeout"] == 0.25
    assert store._pool.connection_kwargs["db"] == 2
    assert store.is_healthy()
    store.close()


@pytest.mark.parametrize("url", ["mongodb://x", "", "redis-cluster://x"])
def test_unknown_scheme_is_rejected(url: str) -> None:
    with pytest.raises(ValueError, match="unknown KV store"):
        open_store(url, TINY_SPEC)
