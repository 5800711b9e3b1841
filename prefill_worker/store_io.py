"""Moving a prompt's K/V between the prefill worker and the KV store.

Both functions block on the store; the servicer runs them off the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from kvstore import BlockHash, KVStore, StoreUnavailableError
from kvstore.hashing import first_seen_block

log = logging.getLogger(__name__)


_MAX_WINDOW_PROBES = 4
"""Lookups a windowed prefix search makes at most before computing the prompt."""


def load_cached_prefix(
    store: KVStore,
    block_hashes: Sequence[BlockHash],
    kv: torch.Tensor,
    window: int | None = None,
) -> tuple[int, int]:
    """Copies the prompt's cached prefix that the store holds into `kv`
    (`[L, 2, prompt_len, H, D]`). Returns (the blocks of the prefix, prompt tokens
    loaded). At least the prompt's last token is left to compute, because its
    logits give the first output token. An unreachable store is a miss. The blocks
    present (the first number) need not be published again.

    Without a `window` the prefix is the leading blocks the store holds. With one
    (every layer's), only the blocks the first computed token's window reaches
    need be stored, so a prefix whose early blocks never were (a windowed prefill
    publishes only what decode reads) still counts; the blocks before them are
    zeroed in `kv`, which no token attends to."""
    block_size = store.spec.block_size
    prompt_len = kv.shape[2]
    hashes = block_hashes[: (prompt_len - 1) // block_size]
    try:
        if window is None:
            num_present = store.lookup(block_hashes)  # all: present ones are not put again
            first, end = 0, min(num_present, len(hashes))
        else:
            first, end = _windowed_prefix(store, hashes, window, block_size)
            num_present = end
        if end == 0:
            return num_present, 0
        views = [kv[:, :, i * block_size : (i + 1) * block_size] for i in range(first, end)]
        found = store.get_into(hashes[first:end], views)
    except StoreUnavailableError as err:
        log.warning("KV store unavailable, computing the whole prompt: %s", err)
        return 0, 0
    # A block evicted between lookup and get ends the usable prefix there; with a
    # window, a shorter prefix would need blocks before `first`: compute it all.
    num_found = found.index(False) if False in found else len(found)
    if window is not None and num_found < len(found):
        return 0, 0
    if first:
        kv[:, :, : first * block_size].zero_()
    return num_present, (first + num_found) * block_size


def _windowed_prefix(
    store: KVStore, hashes: Sequence[BlockHash], window: int, block_size: int
) -> tuple[int, int]:
    """(first, end): the longest prefix of `end` blocks whose blocks from `first` (the
    first its next token sees) the store holds, or (0, 0). Each probe looks up the
    blocks a prefix needs; a miss shortens it to where the stored run ends."""
    end = len(hashes)
    for _ in range(_MAX_WINDOW_PROBES):
        if end == 0:
            break
        first = first_seen_block(end * block_size, window, block_size)
        num_present = store.lookup(hashes[first:end])
        if num_present == end - first:
            return first, end
        end = first + num_present
    return 0, 0


def publish_prompt_kv(
    store: KVStore,
    request_id: str,
    block_hashes: Sequence[BlockHash],
    kv: torch.Tensor,
    first_block: int,
    with_tail: bool,
    prompt_hash: BlockHash,
) -> None:
    """Puts the prompt's full blocks from `first_block` on, and its partial last
    block as the request's tail when `with_tail`, bound to `prompt_hash` (the
    whole prompt's, `kvstore.hashing.hash_prompt`). Raises StoreUnavailableError."""
    block_size = store.spec.block_size
    blocks = [
        (block_hashes[i], kv[:, :, i * block_size : (i + 1) * block_size].contiguous())
        for i in range(first_block, len(block_hashes))
    ]
    if blocks:
        store.put(blocks)
    tail_start = len(block_hashes) * block_size
    if with_tail and tail_start < kv.shape[2]:
        store.put_tail(request_id, kv[:, :, tail_start:].contiguous(), prompt_hash)
