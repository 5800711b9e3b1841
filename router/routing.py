"""Routing policies: which prefill worker and which decode worker serve a request.

Both choices trade prefix locality against load. A worker that already holds a
request's prefix saves work, but sending everything to one worker queues it; so a
worker wins on locality only while its in-flight count is within `load_slack` of
the least-loaded worker's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Mapping, Sequence

from router.registry import WorkerEntry

BlockHash = bytes


class RoutingPolicy(ABC):
    """Chooses workers. Implementations must not block: they run on the event loop."""

    @abstractmethod
    def pick_prefill(
        self, workers: Sequence[WorkerEntry], block_hashes: Sequence[BlockHash]
    ) -> WorkerEntry:
        """A prefill worker for a prompt with these full-block hashes; `workers` is non-empty."""

    @abstractmethod
    def pick_decode(
        self, workers: Sequence[WorkerEntry], num_resident: Mapping[str, int]
    ) -> WorkerEntry:
        """A decode worker, given how many leading prompt blocks each holds (by worker
        id; missing means unknown, taken as 0); `workers` is non-empty."""

    def on_prefilled(self, worker: WorkerEntry, block_hashes: Sequence[BlockHash]) -> None:  # noqa: B027
        """Called after `worker` prefilled a prompt with these block hashes."""

    def forget_worker(self, worker_id: str) -> None:  # noqa: B027
        """Called when a worker leaves the cluster."""


class PrefixIndex:
    """Which prefill worker last computed each block hash: an approximate map (the
    worker's own cache may have dropped the block since), bounded in size by LRU."""

    def __init__(self, capacity: int = 100_000) -> None:
        self._owner: OrderedDict[BlockHash, str] = OrderedDict()
        self._capacity = capacity

    def record(self, worker_id: str, block_hashes: Sequence[BlockHash]) -> None:
        for block_hash in block_hashes:
            self._owner[block_hash] = worker_id
            self._owner.move_to_end(block_hash)
        while len(self._owner) > self._capacity:
            self._owner.popitem(last=False)

    def num_matched(self, worker_id: str, block_hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of the chain last computed by `worker_id`."""
        n = 0
        for block_hash in block_hashes:
            if self._owner.get(block_hash) != worker_id:
                break
            n += 1
        return n

    def forget_worker(self, worker_id: str) -> None:
        for block_hash in [h for h, w in self._owner.items() if w == worker_id]:
            del self._owner[block_hash]


def _pick(
    workers: Sequence[WorkerEntry], locality: Mapping[str, int], load_slack: int
) -> WorkerEntry:
    least = min(w.num_inflight for w in workers)
    eligible = [w for w in workers if w.num_inflight <= least + load_slack]
    # Most locality first, then least loaded, then id so the choice is deterministic.
    return min(eligible, key=lambda w: (-locality.get(w.worker_id, 0), w.num_inflight, w.worker_id))


class PrefixLoadPolicy(RoutingPolicy):
    """Locality first within a load slack, then least in-flight calls."""

    def __init__(self, load_slack: int = 4) -> None:
        self.load_slack = load_slack
        self.prefix_index = PrefixIndex()

    def pick_prefill(
        self, workers: Sequence[WorkerEntry], block_hashes: Sequence[BlockHash]
    ) -> WorkerEntry:
        locality = {
            w.worker_id: self.prefix_index.num_matched(w.worker_id, block_hashes) for w in workers
        }
        return _pick(workers, locality, self.load_slack)

    def pick_decode(
        self, workers: Sequence[WorkerEntry], num_resident: Mapping[str, int]
    ) -> WorkerEntry:
        return _pick(workers, num_resident, self.load_slack)

    def on_prefilled(self, worker: WorkerEntry, block_hashes: Sequence[BlockHash]) -> None:
        self.prefix_index.record(worker.worker_id, block_hashes)

    def forget_worker(self, worker_id: str) -> None:
        self.prefix_index.forget_worker(worker_id)
