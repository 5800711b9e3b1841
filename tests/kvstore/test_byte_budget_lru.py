"""The byte-budgeted LRU behind the in-process stores: exact eviction order."""

from __future__ import annotations

import pytest

from kvstore.lru import ByteBudgetLRU


def test_evicts_least_recently_used_first() -> None:
    lru: ByteBudgetLRU[str, int] = ByteBudgetLRU(budget_bytes=30)
    assert lru.put("a", 1, 10) == []
    assert lru.put("b", 2, 10) == []
    assert lru.put("c", 3, 10) == []
    assert lru.get("a") == 1  # a is now the most recent
    assert lru.contains("b")  # a probe is not a use
    assert lru.put("d", 4, 10) == ["b"]
    assert lru.put("e", 5, 20) == ["c", "a"]
    assert lru.lru_order() == ["d", "e"]
    assert lru.num_bytes == 30


def test_replacing_a_key_frees_its_old_size() -> None:
    lru: ByteBudgetLRU[str, int] = ByteBudgetLRU(budget_bytes=30)
    lru.put("a", 1, 20)
    assert lru.put("a", 2, 25) == []
    assert (lru.get("a"), lru.num_bytes, len(lru)) == (2, 25, 1)


def test_value_larger_than_budget_is_not_stored() -> None:
    lru: ByteBudgetLRU[str, int] = ByteBudgetLRU(budget_bytes=30)
    lru.put("a", 1, 10)
    assert lru.put("huge", 2, 31) == []
    assert lru.lru_order() == ["a"]


def test_pop_and_missing_keys() -> None:
    lru: ByteBudgetLRU[str, int] = ByteBudgetLRU(budget_bytes=30)
    lru.put("a", 1, 10)
    assert lru.pop("a") == 1
    assert lru.pop("a") is None
    assert lru.get("a") is None
    assert lru.num_bytes == 0
    with pytest.raises(ValueError, match="budget_bytes"):
        ByteBudgetLRU(budget_bytes=0)
