"""`load_cached_prefix` on the memory store with exact blocks: the leading prefix
without a window, and with one the longest prefix whose window blocks are stored."""

from __future__ import annotations

import torch

from kvstore.hashing import hash_token_blocks
from kvstore.memory_store import MemoryStore
from kvstore.spec import BlockSpec
from model.loader import load_model
from prefill_worker.store_io import load_cached_prefix

BLOCK = 4


def store_and_blocks(num_tokens: int):
    model = load_model("dummy:tiny")
    spec = BlockSpec.for_model("dummy:tiny", model.config, model.dtype, BLOCK)
    prompt = list(range(3, 3 + num_tokens))
    hashes = hash_token_blocks(prompt, BLOCK, spec.fingerprint)
    blocks = [torch.full(spec.shape, float(i + 1)) for i in range(len(hashes))]
    return MemoryStore(spec), spec, hashes, blocks


def job_kv(spec: BlockSpec, num_tokens: int) -> torch.Tensor:
    shape = list(spec.shape)
    shape[2] = num_tokens
    return torch.full(shape, float("nan"))


def test_without_a_window_only_the_leading_blocks_count() -> None:
    store, spec, hashes, blocks = store_and_blocks(21)  # 5 full blocks and 1 token
    store.put(list(zip(hashes[2:], blocks[2:], strict=True)))  # not blocks 0 and 1
    assert load_cached_prefix(store, hashes, job_kv(spec, 21)) == (0, 0)
    store.put(list(zip(hashes[:2], blocks[:2], strict=True)))
    kv = job_kv(spec, 21)
    assert load_cached_prefix(store, hashes, kv) == (5, 20)
    assert torch.equal(kv[:, :, 8:12], blocks[2])


def test_with_a_window_the_blocks_it_reaches_are_enough() -> None:
    # Window 6: a prefix of 5 blocks (20 tokens) continues at token 20, which sees
    # 15..20: blocks 3 and 4. Blocks 0..2 were never stored.
    store, spec, hashes, blocks = store_and_blocks(21)
    store.put(list(zip(hashes[3:], blocks[3:], strict=True)))
    kv = job_kv(spec, 21)
    assert load_cached_prefix(store, hashes, kv, window=6) == (5, 20)
    assert torch.equal(kv[:, :, 12:16], blocks[3]) and torch.equal(kv[:, :, 16:20], blocks[4])
    assert not kv[:, :, :12].any()  # zeroed, never NaN: no token attends to them


def test_with_a_window_a_miss_shortens_the_prefix_to_the_stored_run() -> None:
    # Blocks 1 and 2 stored, 3 and 4 not: the longest usable prefix is 3 blocks
    # (token 12 sees 7..12: blocks 1 and 2).
    store, spec, hashes, blocks = store_and_blocks(21)
    store.put(list(zip(hashes[1:3], blocks[1:3], strict=True)))
    kv = job_kv(spec, 21)
    assert load_cached_prefix(store, hashes, kv, window=6) == (3, 12)
    assert torch.equal(kv[:, :, 4:8], blocks[1])
    # Nothing stored near the end: nothing usable.
    empty, spec, hashes, _ = store_and_blocks(21)
    assert load_cached_prefix(empty, hashes, job_kv(spec, 21), window=6) == (0, 0)
