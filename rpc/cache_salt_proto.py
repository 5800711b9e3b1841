"""The cache salt of a worker request, read once at the edge of each worker.

A worker takes the salt from its caller as it takes the prompt: checked
(`kvstore.hashing.check_cache_salt`), then used to seed the hashes the worker
computes itself from the prompt's tokens.
"""

from __future__ import annotations

from kvstore.hashing import check_cache_salt
from protos import workers_pb2 as wpb


def cache_salt_from_proto(request: wpb.PrefillRequest | wpb.DecodeRequest) -> str | None:
    """None when unset. Raises ValueError, naming `cache_salt`, for an empty salt or
    one over the limit."""
    cache_salt = request.cache_salt if request.HasField("cache_salt") else None
    check_cache_salt(cache_salt)
    return cache_salt
