"""Block hash → (object, position): the index of stores that keep blocks in batches.

The Ray store puts each `put` batch as one object (one object-store allocation
and one reference for the whole batch, instead of one per block), so a block is
found as a position inside an object, and memory comes back only when a whole
object is dropped. The index therefore evicts whole objects, least recently
used first, and counts each object's full size against its budget.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Generic, NamedTuple, TypeVar

from kvstore.hashing import BlockHash
from kvstore.lru import ByteBudgetLRU

ObjectKey = bytes
"""A stable name for a stored object (the Ray store uses the ObjectRef's id)."""

H = TypeVar("H")
"""The handle that reaches an object (an `ObjectRef`); holding it keeps the object."""

BlockLocation = tuple[ObjectKey, int]
"""An object's key and the block's position inside it."""


class Located(NamedTuple, Generic[H]):
    """Where `locate` found a block."""

    key: ObjectKey
    """The key of the object that holds the block."""
    handle: H
    """The handle of the object that holds the block."""
    position: int
    """The block's position inside the object."""
    object_bytes: int
    """The whole object's size, as `add` was told it."""


class ObjectIndex(Generic[H]):
    """Which object holds each block, within a byte budget over the objects.

    - `add` is idempotent per block: a block already indexed keeps its first
      location (concurrent writers of one prefix do not keep replacing each
      other's objects). An object that brings no new block is not kept, so
      the index drops its handle.
    - Evicting an object unindexes every block it holds. `locate`, `touch` and
      `add` of a known object count as a use of the objects they name;
      `num_leading`, like a prefix probe, does not.
    - An object larger than the whole budget is not indexed.

    Thread-safe: one lock guards the three maps together.
    """

    def __init__(self, budget_bytes: int) -> None:
        # Each object's handle and size; the LRU's own size bookkeeping is private.
        self._objects: ByteBudgetLRU[ObjectKey, tuple[H, int]] = ByteBudgetLRU(budget_bytes)
        self._blocks: dict[BlockHash, BlockLocation] = {}
        self._hashes_of: dict[ObjectKey, list[BlockHash]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        """Blocks indexed now."""
        with self._lock:
            return len(self._blocks)

    @property
    def num_objects(self) -> int:
        with self._lock:
            return len(self._hashes_of)

    @property
    def num_bytes(self) -> int:
        """Bytes of the objects indexed now (at most the budget)."""
        with self._lock:
            return self._objects.num_bytes

    def num_leading(self, hashes: Sequence[BlockHash]) -> int:
        """How many leading `hashes` are indexed. Mutates nothing."""
        with self._lock:
            num_present = 0
            while num_present < len(hashes) and hashes[num_present] in self._blocks:
                num_present += 1
            return num_present

    def add(
        self,
        key: ObjectKey,
        handle: H,
        blocks: Sequence[tuple[BlockHash, int]],
        num_bytes: int,
    ) -> list[ObjectKey]:
        """Indexes `blocks` (hash, position) of the object `key` of `num_bytes`;
        returns the keys of the objects evicted to make room.

        For an object indexed already, indexes those of `blocks` that are new
        (a reader learning more of an object it holds) and counts as a use.
        """
        with self._lock:
            if key in self._hashes_of:
                self._objects.get(key)  # a use: now the most recent
                self._index(key, blocks)
                return []
            if num_bytes > self._objects.budget_bytes:
                return []
            if all(block_hash in self._blocks for block_hash, _ in blocks):
                return []
            evicted = self._objects.put(key, (handle, num_bytes), num_bytes)
            for evicted_key in evicted:
                self._unindex(evicted_key)
            # After the eviction: a block the evicted objects held, which this one
            # holds too, is now found here.
            self._hashes_of[key] = []
            self._index(key, blocks)
            return evicted

    def touch(self, hashes: Sequence[BlockHash]) -> None:
        """Counts the objects holding `hashes` as used (read through handles held
        elsewhere); hashes not indexed are ignored."""
        with self._lock:
            for block_hash in hashes:
                location = self._blocks.get(block_hash)
                if location is not None:
                    self._objects.get(location[0])

    def locate(self, hashes: Sequence[BlockHash]) -> list[Located[H] | None]:
        """Where each block is, `None` for one that is not indexed."""
        with self._lock:
            found: list[Located[H] | None] = []
            for block_hash in hashes:
                location = self._blocks.get(block_hash)
                stored = None if location is None else self._objects.get(location[0])
                if stored is None:
                    found.append(None)
                else:
                    found.append(Located(location[0], stored[0], location[1], stored[1]))
            return found

    def forget(self, keys: Sequence[ObjectKey]) -> None:
        """Drops objects (lost, or reset by an operator) and unindexes their blocks."""
        with self._lock:
            for key in keys:
                self._objects.pop(key)
                self._unindex(key)

    def clear(self) -> None:
        with self._lock:
            for key in list(self._hashes_of):
                self._objects.pop(key)
                self._unindex(key)

    def lru_order(self) -> list[ObjectKey]:
        """Object keys from least to most recently used (a copy)."""
        with self._lock:
            return self._objects.lru_order()

    def _index(self, key: ObjectKey, blocks: Sequence[tuple[BlockHash, int]]) -> None:
        for block_hash, position in blocks:
            if block_hash not in self._blocks:
                self._blocks[block_hash] = (key, position)
                self._hashes_of[key].append(block_hash)

    def _unindex(self, key: ObjectKey) -> None:
        for block_hash in self._hashes_of.pop(key, []):
            del self._blocks[block_hash]
