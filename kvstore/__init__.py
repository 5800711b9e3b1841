"""kvrelay: kvstore — block hashing, the block codec, the `KVStore` interface and
its backends (memory, Redis, Ray object store). Backends are imported lazily by
`open_store`, so importing this package does not import redis or ray."""

from kvstore.codec import BlockCodec, BlockCodecError
from kvstore.factory import open_store
from kvstore.hashing import BlockHash, hash_block, hash_token_blocks
from kvstore.local_cache import LocalCachedStore
from kvstore.spec import BlockSpec
from kvstore.stats import StoreStats
from kvstore.store import KVStore, StoreUnavailableError

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
