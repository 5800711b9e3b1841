"""kvrelay: kvstore — block hashing, the block codec, the `KVStore` interface and
its backends (memory, Redis, Ray object store).

Names are loaded on first use (PEP 562), so `import kvstore.hashing` — all the
router needs — does not import torch, redis or ray.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "BlockCodec": "kvstore.codec",
    "BlockCodecError": "kvstore.codec",
    "BlockHash": "kvstore.hashing",
    "hash_block": "kvstore.hashing",
    "hash_token_blocks": "kvstore.hashing",
    "BlockSpec": "kvstore.spec",
    "KVStore": "kvstore.store",
    "StoreUnavailableError": "kvstore.store",
    "StoreStats": "kvstore.stats",
    "LocalCachedStore": "kvstore.local_cache",
    "open_store": "kvstore.factory",
}

__all__ = [
    "BlockCodec",
    "BlockCodecError",
    "BlockHash",
    "BlockSpec",
    "KVStore",
    "LocalCachedStore",
    "StoreStats",
    "StoreUnavailableError",
    "hash_block",
    "hash_token_blocks",
    "open_store",
]

if TYPE_CHECKING:
    from kvstore.codec import BlockCodec, BlockCodecError
    from kvstore.factory import open_store
    from kvstore.hashing import BlockHash, hash_block, hash_token_blocks
    from kvstore.local_cache import LocalCachedStore
    from kvstore.spec import BlockSpec
    from kvstore.stats import StoreStats
    from kvstore.store import KVStore, StoreUnavailableError


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'kvstore' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
