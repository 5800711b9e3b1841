"""The `KVStore` contract, run against every backend on real servers.

`memory` runs in-process, `redis` against a `redis-server` the fixture starts,
`ray` against a one-CPU local Ray instance, `cached` is `LocalCachedStore` over
`memory`. Each test gets empty stores (Redis is flushed; each Ray test uses its
own namespace and kills its index actor afterwards).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis
import torch
from tiny_blocks import TINY_SPEC, make_block

from kvstore.factory import open_store
from kvstore.hashing import hash_prompt, hash_token_blocks
from kvstore.spec import BlockSpec
from kvstore.stats import StoreStats
from kvstore.store import KVStore

HASHES = hash_token_blocks(list(range(80)), TINY_SPEC.block_size, TINY_SPEC.fingerprint)
PROMPT = hash_prompt(list(range(7)), TINY_SPEC.block_size, TINY_SPEC.fingerprint)
"""The prompt the test's tails end (any prompt hash would do)."""
OTHER_SPEC = BlockSpec("test:other", num_layers=2, num_kv_heads=1, head_dim=4, block_size=4)

OpenStore = Callable[..., KVStore]

BACKENDS = [
    pytest.param("memory", id="memory"),
    pytest.param("cached", id="cached"),
    pytest.param("redis", id="redis", marks=pytest.mark.redis),
    pytest.param("ray", id="ray", marks=[pytest.mark.ray, pytest.mark.slow]),
]


@pytest.fixture(params=BACKENDS)
def open_backend(request: pytest.FixtureRequest) -> Iterator[OpenStore]:
    """Opens stores of the parametrized backend (all sharing one backend instance)."""
    name: str = request.param
    opened: list[KVStore] = []
    if name == "redis":
        server = request.getfixturevalue("shared_redis")
        redis.Redis(port=server.port).flushall()
        url = server.url
    elif name == "ray":
        request.getfixturevalue("local_ray")
        # One namespace for the module: index actors take seconds to start, so
        # tests reuse them and clear them instead.
        url = "ray://?namespace=test-contract"
    else:
        url = "memory"
    shared_memory: dict[str, KVStore] = {}

    def open_(spec: BlockSpec = TINY_SPEC, **options: Any) -> KVStore:
        if name in ("memory", "cached"):
            # In-process stores are shared by spec, like a real backend would be.
            backend = shared_memory.get(spec.model_id)
            if backend is None or options:
                backend = shared_memory[spec.model_id] = open_store(url, spec, **options)
            store = backend if name == "memory" else open_store_cached(backend)
        else:
            store = open_store(url, spec, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        if name == "ray":
            store.clear_index()
        store.close()


def open_store_cached(backend: KVStore) -> KVStore:
    from kvstore.local_cache import LocalCachedStore

    return LocalCachedStore(backend, budget_bytes=4 * TINY_SPEC.nbytes)


@pytest.fixture
def store(open_backend: OpenStore) -> KVStore:
    return open_backend()


def test_empty_store_misses(store: KVStore) -> None:
    assert store.lookup(HASHES[:3]) == 0
    assert store.lookup([]) == 0
    assert store.get(HASHES[:2]) == [None, None]
    assert store.stats() == StoreStats(misses=2)
    assert store.is_healthy()


def test_put_then_get_returns_exact_blocks(store: KVStore) -> None:
    store.put([(HASHES[i], make_block(i)) for i in range(3)])
    blocks = store.get([HASHES[2], HASHES[0], HASHES[5], HASHES[1]])
    assert blocks[2] is None
    for block, seed in zip([blocks[0], blocks[1], blocks[3]], [2, 0, 1], strict=True):
        assert block is not None and torch.equal(block, make_block(seed))
    nbytes = TINY_SPEC.nbytes
    assert store.stats() == StoreStats(hits=3, misses=1, bytes_in=3 * nbytes, bytes_out=3 * nbytes)


def test_lookup_counts_the_leading_run_only(store: KVStore) -> None:
    store.put([(HASHES[i], make_block(i)) for i in (0, 1, 3, 4)])
    assert store.lookup(HASHES[:5]) == 2
    assert store.lookup(HASHES[3:5]) == 2
    assert store.lookup(HASHES[2:5]) == 0
    assert store.lookup(HASHES[:2]) == 2


def test_put_is_idempotent(store: KVStore) -> None:
    store.put([(HASHES[0], make_block(0))])
    store.put([(HASHES[0], make_block(0)), (HASHES[1], make_block(1))])
    assert store.lookup(HASHES[:3]) == 2
    block = store.get([HASHES[0]])[0]
    assert block is not None and torch.equal(block, make_block(0))


def test_get_into_fills_preallocated_tensors(store: KVStore) -> None:
    store.put([(HASHES[0], make_block(10))])
    out = [torch.full(TINY_SPEC.shape, -1.0), torch.full(TINY_SPEC.shape, -1.0)]
    assert store.get_into([HASHES[0], HASHES[1]], out) == [True, False]
    assert torch.equal(out[0], make_block(10))
    assert torch.equal(out[1], torch.full(TINY_SPEC.shape, -1.0))
    with pytest.raises(ValueError, match="2 hashes but 1"):
        store.get_into(HASHES[:2], out[:1])


def test_stored_blocks_are_not_aliased(store: KVStore) -> None:
    block = make_block(1)
    store.put([(HASHES[0], block)])
    block.fill_(0.0)  # the caller reuses its tensor
    got = store.get([HASHES[0]])[0]
    assert got is not None and torch.equal(got, make_block(1))
    got.fill_(0.0)  # the caller owns what it got
    again = store.get([HASHES[0]])[0]
    assert again is not None and torch.equal(again, make_block(1))


def test_put_rejects_wrong_blocks_before_writing(store: KVStore) -> None:
    wrong = torch.zeros(2, 2, 3, 1, 4)
    with pytest.raises(ValueError, match="shape"):
        store.put([(HASHES[0], make_block(0)), (HASHES[1], wrong)])
    with pytest.raises(ValueError, match="dtype"):
        store.put([(HASHES[0], make_block(0).to(torch.float16))])
    assert store.lookup(HASHES[:1]) == 0


def test_tail_lifecycle(store: KVStore) -> None:
    baseline = store.num_tails()
    assert store.get_tail("req-a", PROMPT) is None
    store.put_tail("req-a", make_block(1, num_tokens=3), PROMPT)
    store.put_tail("req-b", make_block(2, num_tokens=4), PROMPT)
    store.put_tail("req-a", make_block(3, num_tokens=1), PROMPT)  # overwrite
    tail = store.get_tail("req-a", PROMPT)
    assert tail is not None and torch.equal(tail, make_block(3, num_tokens=1))
    assert store.num_tails() == baseline + 2
    store.delete_tail("req-a")
    store.delete_tail("req-a")  # a no-op
    store.delete_tail("req-b")
    assert store.get_tail("req-a", PROMPT) is None
    assert store.num_tails() == baseline
    with pytest.raises(ValueError, match="shape"):
        store.put_tail("req-c", torch.zeros(2, 2, 5, 1, 4), PROMPT)


def test_a_tail_read_for_another_prompt_is_a_corrupt_miss(store: KVStore) -> None:
    # A caller naming another request's tail id (its own prompt) gets nothing.
    other = hash_prompt([*range(6), 99], TINY_SPEC.block_size, TINY_SPEC.fingerprint)
    salted = hash_prompt(list(range(7)), TINY_SPEC.block_size, TINY_SPEC.fingerprint, "s")
    store.put_tail("req-p", make_block(1, num_tokens=3), PROMPT)
    before = store.stats()
    assert store.get_tail("req-p", other) is None
    assert store.get_tail("req-p", salted) is None
    after = store.stats()
    assert (after.misses - before.misses, after.corrupt_blocks - before.corrupt_blocks) == (2, 2)
    tail = store.get_tail("req-p", PROMPT)  # still there for its own prompt
    assert tail is not None and torch.equal(tail, make_block(1, num_tokens=3))
    store.delete_tail("req-p")


def test_tails_expire_after_their_ttl(open_backend: OpenStore) -> None:
    store = open_backend(tail_ttl_s=1)
    store.put_tail("req-ttl", make_block(1, num_tokens=2), PROMPT)
    assert store.num_tails() == 1
    time.sleep(1.2)
    assert store.get_tail("req-ttl", PROMPT) is None
    assert store.num_tails() == 0


def test_models_never_share_blocks(open_backend: OpenStore) -> None:
    ours, theirs = open_backend(TINY_SPEC), open_backend(OTHER_SPEC)
    ours.put([(HASHES[0], make_block(0))])
    assert theirs.lookup(HASHES[:1]) == 0
    assert theirs.get(HASHES[:1]) == [None]
    assert ours.lookup(HASHES[:1]) == 1


def test_second_store_object_sees_the_same_blocks(open_backend: OpenStore) -> None:
    writer, reader = open_backend(), open_backend()
    writer.put([(HASHES[0], make_block(5))])
    assert reader.lookup(HASHES[:2]) == 1
    block = reader.get(HASHES[:1])[0]
    assert block is not None and torch.equal(block, make_block(5))


def test_concurrent_callers(store: KVStore) -> None:
    errors: list[BaseException] = []

    def worker(first: int) -> None:
        try:
            for i in range(first, first + 5):
                store.put([(HASHES[i], make_block(i))])
                block = store.get([HASHES[i]])[0]
                assert block is not None and torch.equal(block, make_block(i))
        except BaseException as exc:  # surfaced in the main thread below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(first,)) for first in (0, 5, 10, 15)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert store.lookup(HASHES) == 20
    assert store.stats().hits == 20


@pytest.mark.ray
@pytest.mark.slow
def test_ray_corrupt_objects_are_counted_misses(local_ray: None) -> None:
    import ray

    from kvstore.codec import BlockCodec
    from kvstore.ray.block_batch import pack_blocks
    from kvstore.ray.index_actor import StoredBatch

    store = open_store("ray://?namespace=test-contract", TINY_SPEC)
    codec = BlockCodec(TINY_SPEC)

    def good(i: int) -> list:
        return pack_blocks(codec, [(HASHES[i], make_block(i))])

    flipped = good(0)
    flipped[1] = flipped[1].copy()
    flipped[1][7] ^= 1
    objects = [
        flipped,  # payload bit flip
        good(0),  # a good block, indexed under another hash
        "not a list of blocks",
        [good(3)[0][:40], good(3)[1]],  # truncated header
        [good(4)[0], good(4)[1][:-4]],  # truncated payload
        [good(5)[0]],  # no payload at all
    ]
    for i, stored in enumerate(objects):
        batch = StoredBatch([HASHES[i]], ray.put(stored), TINY_SPEC.nbytes)
        store._call("put", [batch])
    assert store.lookup(HASHES[:6]) == 6
    assert store.get(HASHES[:6]) == [None] * 6
    assert store.stats() == StoreStats(misses=6, corrupt_blocks=6)
    # A corrupt object is dropped from the index, so that a new put replaces it.
    assert store.lookup(HASHES[:6]) == 0
    store.put([(HASHES[0], make_block(0))])
    block = store.get(HASHES[:1])[0]
    assert block is not None and torch.equal(block, make_block(0))
    store.clear_index()
    store.close()
