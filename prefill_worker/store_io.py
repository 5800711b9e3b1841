"""Moving a prompt's K/V between the prefill worker and the KV store.

Both functions block on the store; the servicer runs them off the event loop.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from kvstore import BlockHash, KVStore, StoreUnavailableError

log = logging.getLogger(__name__)


def load_cached_prefix(
    store: KVStore, block_hashes: Sequence[BlockHash], kv: torch.Tensor
) -> tuple[int, int]:
    """Copies the prompt's leading blocks that the store holds into `kv`
    (`[L, 2, prompt_len, H, D]`). Returns (blocks present in the store, prompt tokens
    loaded). At least the prompt's last token is left to compute, because its
    logits give the first output token. An unreachable store is a miss."""
    block_size = store.spec.block_size
    prompt_len = kv.shape[2]
    try:
        num_present = store.lookup(block_hashes)
        num_usable = min(num_present, (prompt_len - 1) // block_size)
        if num_usable == 0:
            return num_present, 0
        views = [kv[:, :, i * block_size : (i + 1) * block_size] for i in range(num_usable)]
        found = store.get_into(block_hashes[:num_usable], views)
    except StoreUnavailableError as err:
        log.warning("KV store unavailable, computing the whole prompt: %s", err)
        return 0, 0
    # A block evicted between lookup and get ends the usable prefix there.
    num_loaded = found.index(False) if False in found else len(found)
    return num_present, num_loaded * block_size


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
