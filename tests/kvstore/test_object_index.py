"""`ObjectIndex` (blocks located inside batch objects) and the index actor's
reply grouping, without Ray: exact locations, eviction order and byte counts."""

from __future__ import annotations

import pytest

from kvstore.ray.index_actor import RayBlockIndex, StoredBatch, group_by_object
from kvstore.ray.object_index import Located, ObjectIndex

H = [bytes([i]) * 16 for i in range(8)]


def positions(hashes: list[bytes]) -> list[tuple[bytes, int]]:
    return [(h, i) for i, h in enumerate(hashes)]


def test_blocks_are_found_at_their_position_in_their_object() -> None:
    index: ObjectIndex[str] = ObjectIndex(budget_bytes=100)
    assert index.add(b"x", "ref-x", positions(H[0:3]), 30) == []
    assert index.add(b"y", "ref-y", positions(H[3:5]), 20) == []
    assert index.locate([H[4], H[0], H[7], H[2]]) == [
        Located(b"y", "ref-y", 1, 20),
        Located(b"x", "ref-x", 0, 30),
        None,
        Located(b"x", "ref-x", 2, 30),
    ]
    assert (len(index), index.num_objects, index.num_bytes) == (5, 2, 50)


def test_eviction_drops_whole_objects_least_recently_located_first() -> None:
    index: ObjectIndex[str] = ObjectIndex(budget_bytes=60)
    index.add(b"x", "ref-x", positions(H[0:2]), 20)
    index.add(b"y", "ref-y", positions(H[2:4]), 20)
    index.add(b"z", "ref-z", positions(H[4:6]), 20)
    index.locate([H[1]])  # x is now the most recently used
    assert index.num_leading(H[2:3]) == 1  # a probe is not a use
    assert index.add(b"w", "ref-w", positions(H[6:8]), 30) == [b"y", b"z"]
    assert index.lru_order() == [b"x", b"w"]
    assert index.locate(H[2:6]) == [None] * 4
    assert index.num_leading(H) == 2
    assert (len(index), index.num_bytes) == (4, 50)


def test_a_block_keeps_its_first_object() -> None:
    index: ObjectIndex[str] = ObjectIndex(budget_bytes=100)
    index.add(b"x", "ref-x", positions(H[0:2]), 20)
    # The second writer's object overlaps the first: only its new block points there.
    index.add(b"y", "ref-y", positions(H[1:3]), 20)
    assert index.locate(H[0:3]) == [
        Located(b"x", "ref-x", 0, 20),
        Located(b"x", "ref-x", 1, 20),
        Located(b"y", "ref-y", 1, 20),
    ]
    # Evicting x unindexes its blocks, not the copy of H[1] that y also holds.
    index.forget([b"x"])
    assert index.locate(H[0:3]) == [None, None, Located(b"y", "ref-y", 1, 20)]


def test_objects_with_nothing_new_or_too_large_are_not_kept() -> None:
    index: ObjectIndex[str] = ObjectIndex(budget_bytes=50)
    index.add(b"x", "ref-x", positions(H[0:2]), 20)
    assert index.add(b"dup", "ref-dup", positions(H[0:2]), 20) == []
    assert index.add(b"huge", "ref-huge", positions(H[2:4]), 51) == []
    assert index.lru_order() == [b"x"]
    assert (len(index), index.num_bytes) == (2, 20)


def test_adding_a_known_object_indexes_its_new_blocks_and_is_a_use() -> None:
    index: ObjectIndex[str] = ObjectIndex(budget_bytes=100)
    index.add(b"x", "ref-x", [(H[0], 0)], 40)  # a reader that located block 0 of x
    index.add(b"y", "ref-y", positions(H[4:6]), 20)
    assert index.add(b"x", "ref-x", [(H[0], 0), (H[3], 3)], 40) == []
    assert index.locate([H[3]]) == [Located(b"x", "ref-x", 3, 40)]
    assert index.lru_order() == [b"y", b"x"]
    assert (len(index), index.num_bytes) == (4, 60)  # x's bytes counted once


def test_an_object_replaces_the_evicted_copy_of_a_block_it_also_holds() -> None:
    index: ObjectIndex[str] = ObjectIndex(budget_bytes=40)
    index.add(b"x", "ref-x", positions(H[0:2]), 20)
    index.add(b"z", "ref-z", positions(H[6:8]), 20)
    index.touch([H[1], bytes(16)])  # x is now the most recent; unknown hashes are ignored
    # y holds H[0] (still indexed in x) and H[3] (new); making room evicts z only.
    assert index.add(b"y", "ref-y", [(H[0], 0), (H[3], 1)], 20) == [b"z"]
    assert index.locate([H[0], H[3]]) == [
        Located(b"x", "ref-x", 0, 20),
        Located(b"y", "ref-y", 1, 20),
    ]
    # Now y evicts x, which held the only indexed copy of H[0]: y's copy takes over.
    index.forget([b"y"])
    index.add(b"w", "ref-w", positions(H[4:6]), 20)
    assert index.add(b"y2", "ref-y2", [(H[0], 0), (H[3], 1)], 20) == [b"x"]
    assert index.locate([H[0], H[1], H[3]]) == [
        Located(b"y2", "ref-y2", 0, 20),
        None,
        Located(b"y2", "ref-y2", 1, 20),
    ]
    assert index.num_leading([H[0]]) == 1


def test_clear_empties_everything() -> None:
    index: ObjectIndex[str] = ObjectIndex(budget_bytes=50)
    index.add(b"x", "ref-x", positions(H[0:2]), 20)
    index.clear()
    assert (len(index), index.num_objects, index.num_bytes) == (0, 0, 0)
    with pytest.raises(ValueError, match="budget_bytes"):
        ObjectIndex(budget_bytes=0)


class FakeRef:
    """Stands in for an `ObjectRef`: the index only asks refs for `binary()`."""

    def __init__(self, name: bytes) -> None:
        self.name = name

    def binary(self) -> bytes:
        return self.name


def test_a_locate_reply_names_each_object_once() -> None:
    x, y = FakeRef(b"x"), FakeRef(b"y")
    found = [Located(b"x", x, 3, 40), None, Located(b"y", y, 0, 10), Located(b"x", x, 1, 40)]
    objects, locations = group_by_object(found)
    assert objects == [(x, 40), (y, 10)]
    assert locations == [(0, 3), None, (1, 0), (0, 1)]


def test_index_actor_state_puts_locates_touches_and_forgets() -> None:
    index = RayBlockIndex(budget_bytes=60, tail_ttl_s=60)
    x, y, z = FakeRef(b"x"), FakeRef(b"y"), FakeRef(b"z")
    index.put([StoredBatch(H[0:3], x, 30), StoredBatch(H[2:4], y, 20)])
    assert index.lookup(H) == 4
    assert index.locate([H[3], H[0], H[6]]) == ([(y, 20), (x, 30)], [(0, 1), (1, 0), None])
    # y was read through a ref held elsewhere: it is the recent one when z needs room.
    index.put([StoredBatch(H[4:6], z, 20)], touched=[H[3]])
    assert (index.lookup(H[2:]), index.num_blocks()) == (0, 3)  # x went, not y
    assert index.lookup(H[3:], touched=[H[0]]) == 3
    index.forget([b"y"])
    assert (index.lookup(H[3:]), index.num_blocks()) == (0, 2)
    index.put_tail("req", [x], 60)
    assert index.get_tail("req") == [x]
    index.clear()
    assert (index.num_blocks(), index.num_tails(), index.get_tail("req")) == (0, 0, None)
