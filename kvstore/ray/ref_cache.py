"""The refs one `RayStore` holds itself, so that re-reading a block needs no actor.

A store keeps the `ObjectRef`s of the objects it put and of those the index
actor located for it, in an `ObjectIndex` with a byte budget of its own. A
`get` of blocks found here goes straight to `ray.get` (a prefill worker
re-reading a prefix it wrote, a worker reading a shared system prompt again).

Two consequences, both bounded:

- Memory: a held ref keeps its object alive after the index has evicted it, so
  the object store holds at most the index's budget plus every store's
  ref-cache budget (and the tails of requests in flight).
- Recency: the index does not see reads served here, so their block hashes
  are reported to it as "touched" with the store's next index call
  (`take_touched`), and a hot prefix read only through ref caches stays recent
  in the index too. By hash, not by object: the object a store holds may be
  another copy of the blocks than the one the index keeps.

`lookup` always asks the index: it is what the prefill worker decides from
which blocks to publish, and those must be the ones every other worker can find.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Generic

from kvstore.hashing import BlockHash
from kvstore.ray.object_index import H, Located, ObjectIndex, ObjectKey

# Touched hashes waiting for the next index call; past this, reads are not reported
# (a store that never calls the index again must not grow without bound).
MAX_PENDING_TOUCHES = 4096


class RefCache(Generic[H]):
    """Object handles by block, within `budget_bytes` (0: hold nothing). Thread-safe."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 0:
            raise ValueError(f"ref_cache_bytes must be >= 0, got {budget_bytes}")
        self._objects: ObjectIndex[H] | None = ObjectIndex(budget_bytes) if budget_bytes else None
        self._touched: set[BlockHash] = set()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Blocks reachable without the index."""
        return 0 if self._objects is None else len(self._objects)

    def locate(self, hashes: Sequence[BlockHash]) -> list[Located[H] | None]:
        """Where each block is, as far as this cache knows; notes the objects as touched."""
        if self._objects is None:
            return [None] * len(hashes)
        found = self._objects.locate(hashes)
        self.give_back_touched([h for h, entry in zip(hashes, found, strict=True) if entry])
        return found

    def add(
        self,
        key: ObjectKey,
        handle: H,
        blocks: Sequence[tuple[BlockHash, int]],
        num_bytes: int,
    ) -> None:
        """Holds `handle` for `blocks` (hash, position) of the object `key`, which
        the index located (blocks held already keep their object)."""
        if self._objects is not None:
            self._objects.add(key, handle, blocks, num_bytes)

    def add_put(
        self,
        key: ObjectKey,
        handle: H,
        blocks: Sequence[tuple[BlockHash, int]],
        num_bytes: int,
    ) -> None:
        """Holds `handle` of an object this store just put, instead of any other
        copy of its blocks it held (a put follows a lookup that found them gone
        from the index: the new object is the one the index keeps)."""
        if self._objects is None:
            return
        held = self._objects.locate([block_hash for block_hash, _ in blocks])
        self._objects.forget([entry.key for entry in held if entry is not None])
        self._objects.add(key, handle, blocks, num_bytes)

    def take_touched(self) -> list[BlockHash]:
        """The blocks read through this cache since the last call (for the index)."""
        with self._lock:
            touched, self._touched = list(self._touched), set()
            return touched

    def give_back_touched(self, hashes: Sequence[BlockHash]) -> None:
        """Notes blocks as read (again, if an index call that carried them failed)."""
        with self._lock:
            room = MAX_PENDING_TOUCHES - len(self._touched)
            self._touched.update(hashes[: max(0, room)])

    def forget(self, keys: Sequence[ObjectKey]) -> None:
        if self._objects is not None:
            self._objects.forget(keys)

    def clear(self) -> None:
        if self._objects is not None:
            self._objects.clear()
        with self._lock:
            self._touched.clear()
