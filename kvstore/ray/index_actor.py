"""The Ray store's index actor: block hash → (object, position), and the tails.

One actor per model fingerprint and Ray namespace, shared by every `RayStore` of
that fingerprint in the cluster. Plain methods, so the logic is testable without
Ray; `RayStore` runs it with `ray.remote(RayBlockIndex)`.

The actor holds the `ObjectRef` of every indexed object: that reference is what
keeps the object alive after its writer dropped its own, and dropping it (when
the byte budget evicts the object) is what frees it, once no ref cache holds it
either. Refs travel to and from the actor inside other values (a `StoredBatch`,
a one-element list), so Ray passes the refs themselves instead of resolving them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from kvstore.hashing import BlockHash
from kvstore.ray.object_index import Located, ObjectIndex, ObjectKey
from kvstore.tail_table import ExpiringTable

ObjectRef = Any
"""A `ray.ObjectRef` (typed loosely so this module does not import ray)."""


class StoredBatch(NamedTuple):
    """One object a `put` stored, as the index learns of it."""

    hashes: list[BlockHash]
    """The hash of each block in the object, in order."""
    ref: ObjectRef
    """The object's `ObjectRef`."""
    num_bytes: int
    """The object's size (its blocks' payloads)."""


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
        if entry.key not in slot_of:
            slot_of[entry.key] = len(objects)
            objects.append((entry.handle, entry.object_bytes))
        locations.append((slot_of[entry.key], entry.position))
    return objects, locations


class RayBlockIndex:
    """The index actor's state: blocks within a byte budget over their objects,
    and request tails (one single-block object each) that expire by themselves.

    `touched` (on `lookup`, `put`, `locate`) names blocks the caller read through
    refs of its own since its last call: the objects that hold them here count
    as used (by hash, because the caller's object may be another copy).
    """

    def __init__(self, budget_bytes: int, tail_ttl_s: float) -> None:
        self._objects: ObjectIndex[ObjectRef] = ObjectIndex(budget_bytes)
        self._tails: ExpiringTable[ObjectRef] = ExpiringTable(tail_ttl_s)

    def ping(self) -> bool:
        return True

    def lookup(self, hashes: Sequence[BlockHash], touched: Sequence[BlockHash] = ()) -> int:
        self._objects.touch(touched)
        return self._objects.num_leading(hashes)

    def put(self, batches: Sequence[StoredBatch], touched: Sequence[BlockHash] = ()) -> None:
        """Indexes the objects of one `put`, in order."""
        self._objects.touch(touched)
        for batch in batches:
            blocks = [(block_hash, i) for i, block_hash in enumerate(batch.hashes)]
            self._objects.add(object_key(batch.ref), batch.ref, blocks, batch.num_bytes)

    def locate(
        self, hashes: Sequence[BlockHash], touched: Sequence[BlockHash] = ()
    ) -> LocatedObjects:
        self._objects.touch(touched)
        return group_by_object(self._objects.locate(hashes))

    def forget(self, keys: Sequence[ObjectKey]) -> None:
        """Drops objects a reader found lost (their writer is gone) or corrupt."""
        self._objects.forget(keys)

    def put_tail(self, request_id: str, boxed_ref: list[ObjectRef], ttl_s: float) -> None:
        """Stores a tail's object (`boxed_ref` is `[ObjectRef]`)."""
        self._tails.put(request_id, boxed_ref[0], ttl_s)

    def get_tail(self, request_id: str) -> list[ObjectRef] | None:
        """The tail's object as `[ObjectRef]`, or `None`."""
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
