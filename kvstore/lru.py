"""A byte-budgeted LRU map, the eviction policy of the in-process stores."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class ByteBudgetLRU(Generic[K, V]):
    """Maps keys to values whose sizes sum to at most `budget_bytes`.

    Inserting past the budget evicts least-recently-used entries first; `get`
    counts as a use, `contains` does not (so a prefix probe does not keep a
    block alive that nobody reads). Thread-safe: every method holds one lock.
    """

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes <= 0:
            raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.num_bytes = 0
        # OrderedDict keeps recency order with O(1) move-to-end and pop-oldest.
        self._entries: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def contains(self, key: K) -> bool:
        with self._lock:
            return key in self._entries

    def get(self, key: K) -> V | None:
        """The value for `key` (now the most recently used), or `None`."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: K, value: V, num_bytes: int) -> list[K]:
        """Inserts or replaces `key`; returns the keys evicted to make room.

        A value larger than the whole budget is not stored (and evicts nothing).
        """
        with self._lock:
            if num_bytes > self.budget_bytes:
                return []
            old = self._entries.pop(key, None)
            if old is not None:
                self.num_bytes -= old[1]
            evicted = []
            while self.num_bytes + num_bytes > self.budget_bytes:
                evicted_key, (_, evicted_bytes) = self._entries.popitem(last=False)
                self.num_bytes -= evicted_bytes
                evicted.append(evicted_key)
            self._entries[key] = (value, num_bytes)
            self.num_bytes += num_bytes
            assert self.num_bytes <= self.budget_bytes
            return evicted

    def pop(self, key: K) -> V | None:
        with self._lock:
            entry = self._entries.pop(key, None)
            if entry is None:
                return None
            self.num_bytes -= entry[1]
            return entry[0]

    def lru_order(self) -> list[K]:
        """Keys from least to most recently used (a copy)."""
        with self._lock:
            return list(self._entries)
