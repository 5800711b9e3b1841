"""`LocalCachedStore` over a memory backend: what is served locally, what is not."""

from __future__ import annotations

import torch
from tiny_blocks import TINY_SPEC, make_block

from kvstore.hashing import hash_token_blocks
from kvstore.local_cache import LocalCachedStore
from kvstore.memory_store import MemoryStore
from kvstore.stats import StoreStats

HASHES = hash_token_blocks(list(range(24)), TINY_SPEC.block_size, TINY_SPEC.fingerprint)


def test_blocks_read_once_are_then_served_locally() -> None:
    backend = MemoryStore(TINY_SPEC)
    backend.put([(HASHES[0], make_block(0)), (HASHES[1], make_block(1))])
    store = LocalCachedStore(backend, budget_bytes=2 * TINY_SPEC.nbytes)
    assert store.lookup(HASHES[:3]) == 2  # from the backend
    store.get(HASHES[:2])
    assert backend.stats().hits == 2
    blocks = store.get(HASHES[:2])
    assert backend.stats().hits == 2  # the second read never reached the backend
    assert store.num_local_hits == 2
    assert all(torch.equal(b, make_block(i)) for i, b in enumerate(blocks) if b is not None)
    nbytes = TINY_SPEC.nbytes
    assert store.stats() == StoreStats(hits=4, bytes_out=4 * nbytes)


def test_local_budget_evicts_lru() -> None:
    backend = MemoryStore(TINY_SPEC)
    store = LocalCachedStore(backend, budget_bytes=2 * TINY_SPEC.nbytes)
    store.put([(HASHES[i], make_block(i)) for i in range(3)])  # written through
    assert backend.num_blocks() == 3
    store.get(HASHES[:1])  # block 0 was evicted locally: fetched from the backend
    assert (backend.stats().hits, store.num_local_hits) == (1, 0)
    store.get(HASHES[2:3])  # block 2 is still local
    assert (backend.stats().hits, store.num_local_hits) == (1, 1)


def test_local_copy_is_not_aliased_by_callers() -> None:
    store = LocalCachedStore(MemoryStore(TINY_SPEC), budget_bytes=4 * TINY_SPEC.nbytes)
    block = make_block(3)
    store.put([(HASHES[0], block)])
    block.zero_()
    got = store.get(HASHES[:1])[0]
    assert got is not None
    got.zero_()
    again = store.get(HASHES[:1])[0]
    assert again is not None and torch.equal(again, make_block(3))
