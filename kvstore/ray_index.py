"""The Ray store's index actor: block hash → (object, position), and the tails.

One actor per model fingerprint and Ray namespace, shared by every `RayStore` of
that fingerprint in the cluster. Plain methods, so the logic is testable without
Ray; `RayStore` runs it with `ray.remote(RayBlockIndex)`.

The actor holds the `ObjectRef` of every indexed object: that reference is what
keeps the object alive after its writer dropped its own, and dropping it (when
the byte budget evicts the object) is what frees it. Refs travel to and from the
actor inside lists, so Ray passes the refs themselves instead of resolving them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from kvstore.hashing import BlockHash
from kvstore.object_index import Located, ObjectIndex, ObjectKey
from kvstore.tail_table import ExpiringTable

ObjectRef = Any
"""A `ray.ObjectRef` (typed loosely so this module does not import ray)."""

LocatedObjects = tuple[list[tuple[ObjectRef, int]], list[tuple[int, int] | None]]
"""A `locate` reply: the distinct objects found, each `(ref, object bytes)`, and
per block asked for `(index into those objects, position in the object)`, or
`None` for a block that is not indexed."""


def object_key(ref: ObjectRef) -> ObjectKey:
    """The index key of the object `ref` names."""
    return ref.binary()


def group_by_object(found: Sequence[Located[ObjectRef] | None]) -> LocatedObjects:
    """`ObjectIndex.locate`'s answer with each object named once: every ref in a
    reply costs Ray bookkeeping, and a batch's blocks share one object."""
    objects: list[tuple[ObjectRef, int]] = []
    slot_of: dict[ObjectKey, int] = {}
    locations: list[tuple[int, int] | None] = []
    for entry in found:
        if entry is None:
            locations.append(None)
            continue
        key = object_key(entry.handle)
        if key not in slot_of:
            slot_of[key] = len(objects)
            objects.append((entry.handle, entry.object_bytes))
        locations.append((slot_of[key], entry.position))
    return objects, locations


class RayBlockIndex:
    """The index actor's state: blocks within a byte budget over their objects,
    and request tails (one single-block object each) that expire by themselves."""

    def __init__(self, budget_bytes: int, tail_ttl_s: float) -> None:
        self._objects: ObjectIndex[ObjectRef] = ObjectIndex(budget_bytes)
        self._tails: ExpiringTable[ObjectRef] = ExpiringTable(tail_ttl_s)

    def ping(self) -> bool:
        return True

    def lookup(self, hashes: Sequence[BlockHash]) -> int:
        return self._objects.num_leading(hashes)

    def put(self, hashes: Sequence[BlockHash], ref: list[ObjectRef], num_bytes: int) -> None:
        """Indexes one object of `num_bytes` (`ref` is `[ObjectRef]`) whose block
        `i` is `hashes[i]`."""
        blocks = [(block_hash, i) for i, block_hash in enumerate(hashes)]
        self._objects.add(object_key(ref[0]), ref[0], blocks, num_bytes)

    def locate(self, hashes: Sequence[BlockHash]) -> LocatedObjects:
        return group_by_object(self._objects.locate(hashes))

    def forget(self, keys: Sequence[ObjectKey]) -> None:
        """Drops objects a reader found lost (their writer is gone)."""
        self._objects.forget(keys)

    def put_tail(self, request_id: str, ref: list[ObjectRef], ttl_s: float) -> None:
        self._tails.put(request_id, ref[0], ttl_s)

    def get_tail(self, request_id: str) -> list[ObjectRef] | None:
        ref = self._tails.get(request_id)
        return None if ref is None else [ref]

    def delete_tail(self, request_id: str) -> None:
        self._tails.delete(request_id)

    def num_tails(self) -> int:
        return len(self._tails)

    def num_blocks(self) -> int:
        return len(self._objects)

    def clear(self) -> None:
        """Drops every block and tail (an operator's reset; tests use it between cases)."""
        self._objects.clear()
        for request_id in self._tails.request_ids():
            self._tails.delete(request_id)
