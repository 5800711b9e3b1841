"""Store counters: a frozen snapshot for readers and a locked recorder for backends."""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass


@dataclass(frozen=True)
class StoreStats:
    """Counters of one store object since it was opened (a snapshot)."""

    hits: int = 0
    """Blocks (and tails) asked for and returned."""
    misses: int = 0
    """Blocks (and tails) asked for and absent, evicted, expired or corrupt."""
    bytes_in: int = 0
    """KV payload bytes written (tensor bytes; codec headers not counted)."""
    bytes_out: int = 0
    """KV payload bytes returned to callers (tensor bytes)."""
    corrupt_blocks: int = 0
    """Stored payloads the codec rejected (each also counted as a miss)."""
    errors: int = 0
    """Calls that raised `StoreUnavailableError`."""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            if getattr(self, field.name) < 0:
                raise ValueError(f"{field.name} must be >= 0")

    @property
    def hit_rate(self) -> float:
        """Fraction of reads that hit; 0.0 before the first read."""
        num_reads = self.hits + self.misses
        return self.hits / num_reads if num_reads else 0.0


class StatsRecorder:
    """Thread-safe counters behind `KVStore.stats()`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts = dict.fromkeys((f.name for f in dataclasses.fields(StoreStats)), 0)

    def add(self, **deltas: int) -> None:
        """Adds to the named counters (names of `StoreStats` fields)."""
        with self._lock:
            for name, delta in deltas.items():
                self._counts[name] += delta

    def snapshot(self) -> StoreStats:
        with self._lock:
            return StoreStats(**self._counts)
