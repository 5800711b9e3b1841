"""Fetching a prefilled prompt's K/V from the KV store for the decode engine."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch

from kvstore import BlockHash, KVStore, StoreUnavailableError
from kvstore.tail_lease import TailLease

log = logging.getLogger(__name__)


def fetch_prompt_kv(
    store: KVStore,
    block_hashes: Sequence[BlockHash],
    tail_id: str,
    prompt_hash: BlockHash,
) -> list[torch.Tensor]:
    """The consecutive blocks of `block_hashes` that the store returns, then the
    tail stored under `tail_id` (if not empty) for the prompt `prompt_hash` names
    when every block came back. A missing or corrupt block, or a tail stored for
    another prompt, ends the list there: the engine computes what was not
    provided, so a miss costs time, never correctness. An unreachable store
    provides nothing.

    With a `tail_id` this worker owns the tail (phase 3 of `kvstore.tail_lease`):
    it is deleted once read, whether or not it could be used. Blocking; call it
    in a thread."""
    try:
        blocks = store.get(block_hashes) if block_hashes else []
        provided: list[torch.Tensor] = []
        for block in blocks:
            if block is None:
                break
            provided.append(block)
        if tail_id:
            with TailLease(functools.partial(store.delete_tail, tail_id), tail_id):
                tail = store.get_tail(tail_id, prompt_hash)
            if tail is not None and len(provided) == len(block_hashes):
                provided.append(tail)
        return provided
    except StoreUnavailableError as err:
        log.warning("KV store unavailable, recomputing the prompt: %s", err)
        return []
