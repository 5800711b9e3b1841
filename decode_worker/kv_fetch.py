"""Fetching a prefilled prompt's K/V from the KV store for the decode engine."""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from kvstore import BlockHash, KVStore, StoreUnavailableError

log = logging.getLogger(__name__)


def fetch_prompt_kv(
    store: KVStore,
    block_hashes: Sequence[BlockHash],
    request_id: str,
    with_tail: bool,
) -> list[torch.Tensor]:
    """The consecutive blocks of `block_hashes` that the store returns, then the
    request's tail when every block came back. A missing or corrupt block ends the
    list there: the engine computes what was not provided, so a miss costs time,
    never correctness. An unreachable store provides nothing. The tail is deleted
    from the store once read (it belongs to this one request)."""
    try:
        blocks = store.get(block_hashes) if block_hashes else []
        provided: list[torch.Tensor] = []
        for block in blocks:
            if block is None:
                break
            provided.append(block)
        if with_tail:
            tail = store.get_tail(request_id)
            store.delete_tail(request_id)
            if tail is not None and len(provided) == len(block_hashes):
                provided.append(tail)
        return provided
    except StoreUnavailableError as err:
        log.warning("KV store unavailable, recomputing request %s: %s", request_id, err)
        return []
