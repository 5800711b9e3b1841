"""What only the Ray backend does, on a real local Ray instance: a `put` is one
object, the index evicts whole objects, and each store's ref cache answers
without the index actor (checked by killing the actor)."""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from tiny_blocks import TINY_SPEC, make_block

from kvstore.hashing import hash_token_blocks
from kvstore.ray.index_actor import object_key
from kvstore.ray.store import RayStore
from kvstore.store import StoreUnavailableError

pytestmark = [pytest.mark.ray, pytest.mark.slow]

HASHES = hash_token_blocks(list(range(40)), TINY_SPEC.block_size, TINY_SPEC.fingerprint)
NBYTES = TINY_SPEC.nbytes
_namespaces = itertools.count()

OpenStore = Callable[..., RayStore]


@pytest.fixture
def open_ray_store(local_ray: None) -> Iterator[OpenStore]:
    """Opens stores that share an index actor of their own; kills it afterwards."""
    import ray

    namespace = f"test-ray-store-{next(_namespaces)}"
    opened: list[RayStore] = []

    def open_(**options: object) -> RayStore:
        store = RayStore(TINY_SPEC, namespace=namespace, **options)
        opened.append(store)
        return store

    yield open_
    for store in opened:
        store.close()
    if opened:
        with contextlib.suppress(ValueError):  # the test killed it already
            ray.kill(ray.get_actor(opened[0]._actor_name, namespace=namespace))


def kill_index(store: RayStore) -> None:
    """Kills the index actor and waits until it is gone (`ray.kill` does not wait)."""
    import ray

    actor = ray.get_actor(store._actor_name, namespace=store.namespace)
    ray.kill(actor)
    deadline = time.monotonic() + 30
    while True:
        try:
            ray.get(actor.ping.remote(), timeout=30)
        except ray.exceptions.RayActorError:
            return
        assert time.monotonic() < deadline, "the index actor did not die"


def blocks(first: int, count: int) -> list[tuple[bytes, torch.Tensor]]:
    return [(HASHES[i], make_block(i)) for i in range(first, first + count)]


def assert_blocks(got: list[torch.Tensor | None], seeds: list[int | None]) -> None:
    assert len(got) == len(seeds)
    for block, seed in zip(got, seeds, strict=True):
        if seed is None:
            assert block is None
        else:
            assert block is not None and torch.equal(block, make_block(seed)), seed


def test_a_put_is_one_object_and_any_subset_reads_back(open_ray_store: OpenStore) -> None:
    writer, reader = open_ray_store(), open_ray_store(ref_cache_bytes=0)
    writer.put(blocks(0, 5))
    objects, locations = writer._call("locate", HASHES[:5])
    assert len(objects) == 1 and objects[0][1] == 5 * NBYTES
    assert locations == [(0, i) for i in range(5)]
    assert_blocks(reader.get([HASHES[3], HASHES[9], HASHES[1]]), [3, None, 1])
    assert reader.num_cached_blocks == 0


def test_a_large_put_is_split_into_objects_of_bounded_size(
    open_ray_store: OpenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvstore.ray import store as ray_store

    monkeypatch.setattr(ray_store, "MAX_OBJECT_BYTES", 2 * NBYTES)
    writer, reader = open_ray_store(), open_ray_store(ref_cache_bytes=0)
    writer.put(blocks(0, 5))
    objects, locations = writer._call("locate", HASHES[:5])
    assert [num_bytes for _, num_bytes in objects] == [2 * NBYTES, 2 * NBYTES, NBYTES]
    assert locations == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]
    assert_blocks(reader.get(HASHES[:5]), [0, 1, 2, 3, 4])


def test_the_writer_reads_its_own_blocks_without_the_index(open_ray_store: OpenStore) -> None:
    writer = open_ray_store()
    writer.put(blocks(0, 3))
    assert writer.num_cached_blocks == 3
    kill_index(writer)
    assert_blocks(writer.get(HASHES[:3]), [0, 1, 2])
    with pytest.raises(StoreUnavailableError):
        writer.lookup(HASHES[:3])  # lookup answers for every worker: only the index can
    # The index comes back empty: a store without refs of its own finds nothing.
    assert_blocks(open_ray_store(ref_cache_bytes=0).get(HASHES[:3]), [None] * 3)


def test_a_reader_caches_the_refs_it_located(open_ray_store: OpenStore) -> None:
    writer, reader = open_ray_store(ref_cache_bytes=0), open_ray_store()
    writer.put(blocks(0, 4))
    assert_blocks(reader.get([HASHES[2], HASHES[0]]), [2, 0])
    assert reader.num_cached_blocks == 2  # only the blocks it asked for
    assert_blocks(reader.get([HASHES[3]]), [3])
    assert reader.num_cached_blocks == 3  # ... and more of the same object later
    kill_index(writer)
    assert_blocks(reader.get([HASHES[0], HASHES[3], HASHES[2]]), [0, 3, 2])
    assert reader.stats().hits == 6


def test_the_ref_cache_budget_bounds_what_a_store_pins(open_ray_store: OpenStore) -> None:
    writer = open_ray_store(ref_cache_bytes=2 * NBYTES)
    for i in range(3):
        writer.put(blocks(i, 1))
    assert writer.num_cached_blocks == 2
    assert writer.num_blocks() == 3
    kill_index(writer)
    # Only the two newest objects are still reachable without the index.
    assert_blocks(writer.get(HASHES[1:3]), [1, 2])
    with pytest.raises(StoreUnavailableError):
        writer.get(HASHES[:1])


def test_the_index_evicts_whole_objects(open_ray_store: OpenStore) -> None:
    writer = open_ray_store(budget_bytes=3 * NBYTES, ref_cache_bytes=0)
    writer.put(blocks(0, 2))
    writer.put(blocks(2, 2))  # 4 blocks > budget: the first object goes, both its blocks
    assert writer.num_blocks() == 2
    assert writer.lookup(HASHES[:4]) == 0
    assert writer.lookup(HASHES[2:4]) == 2
    assert_blocks(writer.get(HASHES[:4]), [None, None, 2, 3])


def test_an_evicted_block_pinned_by_its_writer_is_published_again(
    open_ray_store: OpenStore,
) -> None:
    writer = open_ray_store(budget_bytes=3 * NBYTES)
    writer.put(blocks(0, 2))
    writer.put(blocks(2, 2))
    other = open_ray_store(ref_cache_bytes=0)
    # The writer still reads blocks 0-1 through its own refs, but its lookup says
    # what everyone sees, so the prefill worker computes and puts them again.
    assert_blocks(writer.get(HASHES[:2]), [0, 1])
    assert writer.lookup(HASHES[:4]) == other.lookup(HASHES[:4]) == 0
    writer.put(blocks(0, 2))
    assert other.lookup(HASHES[:2]) == 2
    assert_blocks(other.get(HASHES[:2]), [0, 1])


def test_reads_through_the_ref_cache_keep_an_object_recent_in_the_index(
    open_ray_store: OpenStore,
) -> None:
    writer = open_ray_store(budget_bytes=3 * NBYTES)
    other = open_ray_store(ref_cache_bytes=0)
    writer.put(blocks(0, 2))  # a hot prefix
    other.put(blocks(2, 1))
    assert_blocks(writer.get(HASHES[:2]), [0, 1])  # served by the writer's refs
    writer.lookup(HASHES[:2])  # its next index call reports the read
    other.put(blocks(3, 1))  # needs room: the least recently *read* object goes
    assert other.lookup(HASHES[:2]) == 2
    assert other.lookup(HASHES[2:3]) == 0


def test_a_republished_prefix_read_through_the_cache_stays_recent(
    open_ray_store: OpenStore,
) -> None:
    writer = open_ray_store(budget_bytes=4 * NBYTES)
    other = open_ray_store(ref_cache_bytes=0)
    writer.put(blocks(0, 2))  # the prefix, as object O1
    other.put(blocks(2, 2))
    other.put(blocks(4, 2))  # evicts O1; the writer still holds it
    assert writer.lookup(HASHES[:2]) == 0
    writer.put(blocks(0, 2))  # published again, as O3 (evicting blocks 2-3)
    # The writer now holds O3 itself, not O1 as well: one copy pinned, not two.
    (index_ref, _), *_ = other._call("locate", HASHES[:1], [])[0]
    assert [entry.key for entry in writer._ref_cache.locate(HASHES[:2])] == [
        object_key(index_ref)
    ] * 2
    assert other.get(HASHES[4:6]) != [None, None]  # blocks 4-5 are now the recent ones
    # The writer's reads must count for O3, the copy the index keeps.
    assert_blocks(writer.get(HASHES[:2]), [0, 1])
    writer.lookup(HASHES[:1])
    other.put(blocks(6, 2))  # needs room: blocks 4-5 go, the prefix stays
    assert other.lookup(HASHES[:2]) == 2
    assert other.lookup(HASHES[4:6]) == 0


def test_a_dead_writers_blocks_leave_the_ref_cache_and_the_index(
    open_ray_store: OpenStore,
) -> None:
    import ray

    @ray.remote(num_cpus=0)
    class Writer:
        """Owns the objects it puts; they are lost when it dies."""

        def put(self, namespace: str, spec: object, blocks: list) -> None:
            from kvstore.ray.store import RayStore

            self.store = RayStore(spec, namespace=namespace)  # holds the refs until it dies
            self.store.put(blocks)

    reader = open_ray_store()
    writer = Writer.remote()
    ray.get(writer.put.remote(reader.namespace, TINY_SPEC, blocks(0, 2)))
    assert_blocks(reader.get(HASHES[:2]), [0, 1])
    assert reader.num_cached_blocks == 2
    ray.kill(writer)
    deadline = time.monotonic() + 30
    while reader.get(HASHES[:1]) != [None]:
        assert time.monotonic() < deadline, "the writer's objects were never lost"
        time.sleep(0.1)
    assert reader.num_cached_blocks == 0
    assert reader.lookup(HASHES[:2]) == 0
    assert reader.get(HASHES[:2]) == [None, None]


def test_bad_ref_cache_budget_is_refused(local_ray: None) -> None:
    with pytest.raises(ValueError, match="ref_cache_bytes"):
        RayStore(TINY_SPEC, namespace="test-ray-store-bad", ref_cache_bytes=-1)


def test_an_index_actor_that_dies_is_restarted_by_ray_and_the_store_goes_on(
    open_ray_store: OpenStore,
) -> None:
    import ray

    store = open_ray_store(ref_cache_bytes=0)
    store.put(blocks(0, 2))
    actor = ray.get_actor(store._actor_name, namespace=store.namespace)
    pid = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
    ray.kill(actor, no_restart=False)  # as a crash would: Ray restarts it
    deadline = time.monotonic() + 60
    while True:
        try:
            restarted = ray.get(actor.__ray_call__.remote(lambda self: __import__("os").getpid()))
            if restarted != pid:
                break
        except ray.exceptions.RayActorError:
            pass
        assert time.monotonic() < deadline, "Ray did not restart the index actor"
        time.sleep(0.2)
    # The same actor (same name, same handle), with an empty index: old blocks are
    # misses, and the store serves new ones at once.
    assert ray.get_actor(store._actor_name, namespace=store.namespace)._actor_id == actor._actor_id
    assert store.lookup(HASHES[:2]) == 0
    store.put(blocks(2, 2))
    assert_blocks(store.get(HASHES[2:4]), [2, 3])
