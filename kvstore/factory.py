"""`open_store`: the one place a store URL becomes a backend."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

from kvstore.local_cache import LocalCachedStore
from kvstore.spec import BlockSpec
from kvstore.store import KVStore

# Query parameters that are store options (everything else in a Redis URL is
# left for redis-py: `ssl_cert_reqs`, `db`, ...).
_INT_OPTIONS = {
    "budget_bytes",
    "block_ttl_s",
    "max_connections",
    "local_cache_bytes",
    "ref_cache_bytes",
}
_FLOAT_OPTIONS = {"timeout_s", "tail_ttl_s"}


def open_store(url: str, spec: BlockSpec, **options: Any) -> KVStore:
    """Opens the KV store `url` names, for blocks of `spec`.

    - `memory`, `memory://?budget_bytes=N&tail_ttl_s=S`: in-process (`MemoryStore`).
    - `redis://[user:password@]host:port[/db]`, `rediss://...` (TLS): `RedisStore`;
      options `timeout_s`, `block_ttl_s`, `tail_ttl_s`, `max_connections`.
    - `ray`, `ray://?namespace=NAME&budget_bytes=N`: `RayStore` on the Ray cluster
      this process is (or gets) connected to; options `namespace`, `budget_bytes`,
      `ref_cache_bytes`, `tail_ttl_s`, `timeout_s`, `is_detached`.

    Options come from keyword arguments or the URL's query string (keywords win).
    `secret=b"..."` (keyword only, never from the URL) is the cluster's KV secret:
    Redis and Ray blocks then carry a MAC (`kvstore.codec`); an in-process memory
    store has no one to authenticate against and ignores it.
    `local_cache_bytes=N` puts a worker-local LRU of N bytes (`LocalCachedStore`)
    in front of the backend. Raises `ValueError` for an unknown scheme or option.
    """
    parts = urlsplit(url)
    scheme = parts.scheme or parts.path
    query_options, passthrough = _split_query(parts.query)
    options = {**query_options, **options}
    local_cache_bytes = options.pop("local_cache_bytes", None)
    if scheme == "memory":
        from kvstore.memory_store import MemoryStore

        options.pop("secret", None)
        store: KVStore = MemoryStore(spec, **options)
    elif scheme in ("redis", "rediss"):
        from kvstore.redis.store import RedisStore

        redis_url = parts._replace(query=passthrough).geturl()
        store = RedisStore(redis_url, spec, **options)
    elif scheme == "ray":
        from kvstore.ray.store import RayStore

        store = RayStore(spec, **options)
    else:
        raise ValueError(
            f"unknown KV store {url!r}: use memory, redis://host:port, rediss://host:port or ray"
        )
    if local_cache_bytes:
        store = LocalCachedStore(store, int(local_cache_bytes))
    return store


def _split_query(query: str) -> tuple[dict[str, Any], str]:
    """Store options typed from the query string, and the query left for the backend."""
    options: dict[str, Any] = {}
    passthrough: list[tuple[str, str]] = []
    for name, value in parse_qsl(query, keep_blank_values=True):
        if name == "secret":
            raise ValueError("a KV secret never goes in the store URL: use --kv-secret-file")
        if name in _INT_OPTIONS:
            options[name] = int(value)
        elif name in _FLOAT_OPTIONS:
            options[name] = float(value)
        elif name == "namespace":
            options[name] = value
        else:
            passthrough.append((name, value))
    return options, urlencode(passthrough)
