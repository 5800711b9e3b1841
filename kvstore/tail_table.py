"""Request-scoped entries that expire by themselves (the in-process tail map)."""

from __future__ import annotations

import threading
import time
from typing import Generic, TypeVar

V = TypeVar("V")


class ExpiringTable(Generic[V]):
    """Maps request ids to values that vanish `ttl_s` seconds (or the `put`'s own
    `ttl_s`) after their last `put`.

    Expired entries are purged lazily on every call, so there is no timer
    thread to stop. Thread-safe.
    """

    def __init__(self, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s}")
        self.ttl_s = ttl_s
        self._entries: dict[str, tuple[V, float]] = {}
        self._lock = threading.Lock()

    def put(self, request_id: str, value: V, ttl_s: float | None = None) -> None:
        with self._lock:
            self._purge()
            self._entries[request_id] = (value, time.monotonic() + (ttl_s or self.ttl_s))

    def get(self, request_id: str) -> V | None:
        with self._lock:
            self._purge()
            entry = self._entries.get(request_id)
            return None if entry is None else entry[0]

    def delete(self, request_id: str) -> None:
        with self._lock:
            self._entries.pop(request_id, None)

    def request_ids(self) -> list[str]:
        with self._lock:
            self._purge()
            return list(self._entries)

    def __len__(self) -> int:
        with self._lock:
            self._purge()
            return len(self._entries)

    def _purge(self) -> None:
        now = time.monotonic()
        for request_id in [r for r, (_, deadline) in self._entries.items() if deadline <= now]:
            del self._entries[request_id]
