"""`ObjectIndex` (blocks located inside batch objects) and the index actor's
reply grouping, without Ray: exact locations, eviction order and byte counts."""

from __future__ import annotations

import pytest

from kvstore.object_index import Located, ObjectIndex
from kvstore.ray_index import RayBlockIndex, group_by_object

H = [bytes([i]) * 16 for i in range(8)]


def positions(hashes: list[bytes]) -> list[tuple[bytes, int]]:
    return [(h, i) for i, h in enumerate(hashes)]


def test_blocks_are_found_at_their_position_in_their_object() -> None:
    index: ObjectIndex[str] = ObjectIndex(budget_bytes=100)
    assert index.add(b"x", "ref-x", positions(H[0:3]), 30) == []
    assert index.add(b"y", "ref-y", positions(H[3:5]), 20) == []
    assert index.locate([H[4], H[0], H[7], H[2]]) == [
        Located("ref-y", 1, 20),
        Located("ref-x", 0, 30),
        None,
        Located("ref-x", 2, 30),
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
        Located("ref-x", 0, 20),
        Located("ref-x", 1, 20),
        Located("ref-y", 1, 20),
    ]
    # Evicting x unindexes its blocks, not the copy of H[1] that y also holds.
    index.forget([b"x"])
    assert index.locate(H[0:3]) == [None, None, Located("ref-y", 1, 20)]


def test_objects_with_nothing_new_or_too_large_are_not_kept() -> None:
    index: ObjectIndex[str] = ObjectIndex(budget_bytes=50)
    index.add(b"x", "ref-x", positions(H[0:2]), 20)
    assert index.add(b"dup", "ref-dup", positions(H[0:2]), 20) == []
    assert index.add(b"huge", "ref-huge", positions(H[2:4]), 51) == []
    assert index.add(b"x", "ref-x-again", positions(H[4:6]), 20) == []  # a known key
    assert index.lru_order() == [b"x"]
    assert (len(index), index.num_bytes) == (2, 20)


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
    found = [Located(x, 3, 40), None, Located(y, 0, 10), Located(x, 1, 40)]
    objects, locations = group_by_object(found)
    assert objects == [(x, 40), (y, 10)]
    assert locations == [(0, 3), None, (1, 0), (0, 1)]


def test_index_actor_state_puts_locates_and_forgets() -> None:
    index = RayBlockIndex(budget_bytes=100, tail_ttl_s=60)
    x, y = FakeRef(b"x"), FakeRef(b"y")
    index.put(H[0:3], [x], 30)
    index.put(H[2:4], [y], 20)
    assert index.lookup(H) == 4
    assert index.locate([H[3], H[0], H[6]]) == ([(y, 20), (x, 30)], [(0, 1), (1, 0), None])
    index.forget([b"x"])
    assert (index.lookup(H), index.num_blocks()) == (0, 1)
    index.put_tail("req", [x], 60)
    assert index.get_tail("req") == [x]
    index.clear()
    assert (index.num_blocks(), index.num_tails(), index.get_tail("req")) == (0, 0, None)
