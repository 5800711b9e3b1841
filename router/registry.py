"""The workers the router knows: who they are, where, and how loaded.

Workers register, heartbeat and deregister; one that misses heartbeats for
`expiry_s` is dropped. Load used for routing is the router's own count of calls in
flight to each worker (exact and current), not the heartbeat's (late by up to one
interval); heartbeat figures are kept for `kvrelay status`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum


class Role(Enum):
    PREFILL = "prefill"
    DECODE = "decode"


@dataclass
class WorkerEntry:
    worker_id: str
    role: Role
    address: str
    max_local_prefill_len: int = 0
    """Decode workers: prompts up to this many tokens are prefilled there, not by a
    prefill worker."""
    num_inflight: int = 0
    """Calls the router has in flight to this worker."""
    num_waiting: int = 0
    """From the last heartbeat."""
    num_running: int = 0
    """From the last heartbeat."""
    kv_usage: float = 0.0
    """From the last heartbeat."""
    is_draining: bool = False
    """The worker said it is draining: nothing new is routed to it; its calls go on."""
    is_stalled: bool = False
    """From the last heartbeat: its engine is stalled, so nothing is routed to it."""
    is_store_unavailable: bool = False
    """From the last heartbeat: it cannot reach its KV store (it still serves)."""
    last_seen: float = field(default_factory=time.monotonic)
    loss_watchers: set[Callable[[], None]] = field(default_factory=set, repr=False)
    """Called when the worker is declared lost (it missed its heartbeats), so calls
    in flight to it fail over at once instead of waiting for their timeouts."""

    @property
    def is_routable(self) -> bool:
        return not self.is_draining and not self.is_stalled

    def declare_lost(self) -> None:
        for watcher in list(self.loss_watchers):
            watcher()


class WorkerRegistry:
    """Workers by id. Not thread-safe: the router uses it from its event loop."""

    def __init__(self, expiry_s: float, clock=time.monotonic) -> None:
        self._workers: dict[str, WorkerEntry] = {}
        self._expiry_s = expiry_s
        self._clock = clock

    def register(
        self, worker_id: str, role: Role, address: str, max_local_prefill_len: int = 0
    ) -> WorkerEntry:
        """Adds a worker. A worker registering again at the same address (it lost
        touch with the router for a while) keeps its entry, so its calls in flight and
        their counts go on; one at a new address (it restarted) gets a new entry."""
        known = self._workers.get(worker_id)
        if known is not None and (known.role, known.address) == (role, address):
            known.max_local_prefill_len = max_local_prefill_len
            known.is_draining = False
            known.last_seen = self._clock()
            return known
        entry = WorkerEntry(
            worker_id, role, address, max_local_prefill_len, last_seen=self._clock()
        )
        self._workers[worker_id] = entry
        return entry

    def heartbeat(
        self,
        worker_id: str,
        num_waiting: int,
        num_running: int,
        kv_usage: float,
        is_draining: bool = False,
        is_stalled: bool = False,
        is_store_unavailable: bool = False,
    ) -> bool:
        """Records load and state; False when the worker is unknown (it must register
        again). Draining is for good; a stall or a store outage lasts while reported."""
        entry = self._workers.get(worker_id)
        if entry is None:
            return False
        entry.num_waiting, entry.num_running, entry.kv_usage = num_waiting, num_running, kv_usage
        entry.is_draining = entry.is_draining or is_draining
        entry.is_stalled, entry.is_store_unavailable = is_stalled, is_store_unavailable
        entry.last_seen = self._clock()
        return True

    def deregister(self, worker_id: str) -> WorkerEntry | None:
        return self._workers.pop(worker_id, None)

    def expire(self) -> list[WorkerEntry]:
        """Drops and returns workers whose last heartbeat is older than the expiry."""
        now = self._clock()
        dead = [w for w in self._workers.values() if now - w.last_seen > self._expiry_s]
        for entry in dead:
            del self._workers[entry.worker_id]
        return dead

    def get(self, worker_id: str) -> WorkerEntry | None:
        return self._workers.get(worker_id)

    def workers(self, role: Role | None = None) -> list[WorkerEntry]:
        return [w for w in self._workers.values() if role is None or w.role is role]
