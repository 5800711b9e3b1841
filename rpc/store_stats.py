"""KV store counters on the wire."""

from __future__ import annotations

from kvstore.stats import StoreStats
from protos import workers_pb2 as wpb


def store_stats_to_proto(stats: StoreStats) -> wpb.StoreStats:
    return wpb.StoreStats(
        hits=stats.hits,
        misses=stats.misses,
        bytes_in=stats.bytes_in,
        bytes_out=stats.bytes_out,
        corrupt_blocks=stats.corrupt_blocks,
        errors=stats.errors,
    )
