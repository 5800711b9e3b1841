"""KV store counters on the wire, and what a worker says about its store."""

from __future__ import annotations

import logging

from kvstore import KVStore
from kvstore.stats import StoreStats
from protos import workers_pb2 as wpb

log = logging.getLogger(__name__)


def store_stats_to_proto(stats: StoreStats) -> wpb.StoreStats:
    return wpb.StoreStats(
        hits=stats.hits,
        misses=stats.misses,
        bytes_in=stats.bytes_in,
        bytes_out=stats.bytes_out,
        corrupt_blocks=stats.corrupt_blocks,
        errors=stats.errors,
    )


def warn_if_unauthenticated(store: KVStore, url: str) -> None:
    """One start-up line when blocks that leave this process carry no MAC."""
    if not url.startswith("memory") and not store.is_authenticated:
        log.warning(
            "KV blocks are unauthenticated (no --kv-secret-file): anyone who can write to "
            "%s can plant K/V that this worker would use",
            url.split("@")[-1],
        )
