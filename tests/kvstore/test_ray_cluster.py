"""The Ray backend across the two nodes of a real (local) Ray cluster."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from tiny_blocks import make_block

from kvstore.hashing import hash_token_blocks
from kvstore.spec import BlockSpec

pytestmark = [pytest.mark.ray, pytest.mark.slow]

# 192 KiB blocks: above Ray's 100 KiB inline limit, so they live in the object
# store of the writer's node, as real blocks do.
SPEC = BlockSpec("test:ray-cluster", num_layers=4, num_kv_heads=4, head_dim=96, block_size=32)
HASHES = hash_token_blocks(list(range(96)), SPEC.block_size, SPEC.fingerprint)


@pytest.fixture(scope="module")
def two_node_cluster() -> Iterator[None]:
    """A head node with resource `node_a` and a second node with `node_b`, one CPU each."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "resources": {"node_a": 1}, "include_dashboard": False},
    )
    cluster.add_node(num_cpus=1, resources={"node_b": 1})
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()
    cluster.shutdown()


def is_dead(actor: object) -> bool:
    """Whether a call to the writer actor fails because the actor is gone."""
    import ray

    try:
        ray.get(actor.put.remote([]), timeout=30)
    except ray.exceptions.RayActorError:
        return True
    return False


def test_block_put_on_one_node_is_read_on_the_other(two_node_cluster: None) -> None:
    import ray

    @ray.remote(num_cpus=0, resources={"node_a": 1})
    class Writer:
        """Puts blocks from node A and stays alive: it owns their objects."""

        def put(self, blocks: list[tuple[bytes, torch.Tensor]]) -> str:
            from kvstore.ray.store import RayStore

            RayStore(SPEC, namespace="two-node").put(blocks)
            return ray.get_runtime_context().get_node_id()

    # max_calls=1: a fresh worker process per read, so nothing is served from a
    # reader's own memory.
    @ray.remote(num_cpus=0, resources={"node_b": 1}, max_calls=1)
    def read(hashes: list[bytes]) -> tuple[str, int, list[torch.Tensor | None], int]:
        from kvstore.ray.store import RayStore

        store = RayStore(SPEC, namespace="two-node")
        num_present = store.lookup(hashes)
        blocks = store.get(hashes)
        return ray.get_runtime_context().get_node_id(), num_present, blocks, store.stats().misses

    writer = Writer.remote()
    writer_node = ray.get(
        writer.put.remote([(HASHES[0], make_block(0, SPEC)), (HASHES[1], make_block(1, SPEC))])
    )
    reader_node, num_present, blocks, num_misses = ray.get(read.remote(HASHES))
    assert reader_node != writer_node
    assert num_present == 2
    assert blocks[2] is None and num_misses == 1
    assert torch.equal(blocks[0], make_block(0, SPEC)) and torch.equal(
        blocks[1], make_block(1, SPEC)
    )

    # The objects are owned by the writer (Ray >= 2.56 has no `_owner=`): once it
    # is gone, its blocks are misses, and the index forgets them.
    ray.kill(writer)
    # The kill is asynchronous: a call sent right after it may still be served.
    deadline = time.monotonic() + 30
    while not is_dead(writer):
        assert time.monotonic() < deadline, "the writer did not die"
    _, num_present, blocks, num_misses = ray.get(read.remote(HASHES[:2]))
    assert num_present == 2  # the index cannot know until someone reads
    assert blocks == [None, None] and num_misses == 2
    _, num_present, _, _ = ray.get(read.remote(HASHES[:2]))
    assert num_present == 0
