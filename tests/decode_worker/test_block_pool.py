"""BlockPool on a tiny pool: exact block ids, eviction order, prefix reuse, payload copies."""

from __future__ import annotations

import pytest
import torch

from decode_worker.block_pool import BlockPool, BlockPoolConfig, NoFreeBlocksError


def make_pool(num_blocks: int = 10) -> BlockPool:
    return BlockPool(
        BlockPoolConfig(
            num_blocks=num_blocks, block_size=4, num_layers=2, num_kv_heads=2, head_dim=8
        )
    )


def assert_all_free(pool: BlockPool) -> None:
    pool.check_integrity()
    assert pool.num_free_blocks == pool.num_blocks
    assert pool.usage() == 0.0


def test_allocates_lowest_ids_first_and_reuses_in_free_order() -> None:
    pool = make_pool()
    assert pool.allocate(3) == [0, 1, 2]
    assert pool.allocate(2) == [3, 4]
    assert pool.usage() == 0.5
    pool.free([1, 0])
    # Uncached free blocks queue in the order they were freed, behind never-used ones.
    assert pool.allocate(7) == [5, 6, 7, 8, 9, 1, 0]
    pool.free([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    assert_all_free(pool)


def test_allocate_more_than_free_raises_and_takes_nothing() -> None:
    pool = make_pool()
    held = pool.allocate(8)
    with pytest.raises(NoFreeBlocksError, match="asked for 3 blocks, 2 of 10 free"):
        pool.allocate(3)
    assert pool.num_free_blocks == 2
    pool.free(held)
    assert_all_free(pool)


def test_cached_blocks_are_evicted_last_and_least_recently_freed_first() -> None:
    pool = make_pool(4)
    blocks = pool.allocate(4)
    assert pool.register_hash(blocks[0], b"h0")
    assert pool.register_hash(blocks[2], b"h2")
    pool.free([2, 0, 3, 1])  # 2 then 0 go to the cached queue; 3, 1 to the uncached one
    assert pool.num_cached_free_blocks == 2
    assert pool.allocate(2) == [3, 1]
    assert pool.lookup_prefix([b"h0"]) == 1
    assert pool.allocate(1) == [2]  # least recently freed cached block goes first
    assert pool.block_hash(2) is None and pool.cached_block(b"h2") is None
    assert pool.allocate(1) == [0]
    assert pool.cached_block(b"h0") is None
    pool.free([0, 1, 2, 3])
    assert_all_free(pool)


def test_prefix_lookup_and_acquire_shares_and_reclaims_blocks() -> None:
    pool = make_pool()
    first = pool.allocate(3)
    for block_id, block_hash in zip(first, [b"a", b"b", b"c"], strict=True):
        pool.register_hash(block_id, block_hash)
    assert pool.lookup_prefix([b"a", b"b", b"x", b"c"]) == 2
    assert pool.lookup_prefix([b"x", b"a"]) == 0
    # A second sequence shares the used blocks.
    assert pool.acquire_cached([b"a", b"b"]) == [0, 1]
    assert [pool.ref_count(b) for b in range(3)] == [2, 2, 1]
    pool.free(list(reversed(first)))
    assert pool.num_cached_free_blocks == 1  # only block 2 ("c") dropped to zero
    # Reclaiming a free cached block takes it out of the middle of the free queue.
    assert pool.acquire_cached([b"c"]) == [2]
    assert pool.num_cached_free_blocks == 0
    pool.check_integrity()
    with pytest.raises(KeyError, match="1 of 2 block hashes are not resident"):
        pool.acquire_cached([b"a", b"zz"])
    assert pool.ref_count(0) == 1  # nothing taken by the failed call
    pool.free([2, 1, 0])
    assert pool.num_cached_free_blocks == 3
    assert_all_free(pool)


def test_duplicate_hash_keeps_first_block() -> None:
    pool = make_pool()
    a, b = pool.allocate(2)
    assert pool.register_hash(a, b"same")
    assert not pool.register_hash(b, b"same")
    assert pool.cached_block(b"same") == a and pool.block_hash(b) is None
    pool.free([b, a])
    assert pool.num_cached_free_blocks == 1
    assert_all_free(pool)


def test_double_free_is_an_assertion() -> None:
    pool = make_pool()
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(AssertionError, match="freed more than once"):
        pool.free([block])
    assert_all_free(pool)


def test_layer_caches_are_contiguous_views_and_blocks_round_trip() -> None:
    pool = make_pool()
    config = pool.config
    assert pool.key_cache(1).shape == (10, 4, 2, 8) and pool.key_cache(1).is_contiguous()
    payload = torch.arange(torch.Size(config.block_payload_shape).numel(), dtype=torch.float32)
    payload = payload.view(config.block_payload_shape)
    pool.write_block(7, payload)
    assert torch.equal(pool.read_block(7), payload)
    assert torch.equal(pool.key_cache(1)[7], payload[1, 0])
    assert torch.equal(pool.value_cache(0)[7], payload[0, 1])
    assert pool.key_cache(0)[6].abs().sum() == 0 and pool.key_cache(0)[8].abs().sum() == 0
    with pytest.raises(ValueError, match="block payload shape"):
        pool.write_block(7, payload[:1])
    with pytest.raises(ValueError, match="block payload dtype"):
        pool.write_block(7, payload.double())


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="num_blocks must be a positive int"):
        BlockPoolConfig(num_blocks=0)
    with pytest.raises(ValueError, match="dtype must be a floating type"):
        BlockPoolConfig(num_blocks=4, dtype=torch.int32)
