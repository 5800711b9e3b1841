"""Publishing the blocks a decode worker computes, beside the engine loop.

Every full block the engine fills (generated tokens, and prompts it prefilled
itself) goes to the KV store under the same chained hash as a prompt block. Two
things follow: a request resumed on another decode worker after this one died
fetches everything but its last partial block, and the next turn of a
conversation (previous prompt + answer + new message) finds the whole previous
turn in the store, on any worker.

The engine thread only copies the blocks out of its pool and enqueues them; the
store's put runs on this publisher's thread, so the decode loop never waits for
the store. The queue is bounded: when the store is slower than generation,
batches are dropped (and counted) rather than piling up. Publishing is an
optimization only; a block that never reaches the store is recomputed if needed.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence

import torch

from kvstore import BlockHash, KVStore, StoreUnavailableError

log = logging.getLogger(__name__)

DEFAULT_MAX_PENDING_BATCHES = 64


class BlockPublisher:
    """A thread that puts computed blocks into a store. `submit` is thread-safe and
    never blocks."""

    def __init__(self, store: KVStore, max_pending_batches: int = DEFAULT_MAX_PENDING_BATCHES):
        self.store = store
        self._queue: queue.Queue[list[tuple[BlockHash, torch.Tensor]] | None] = queue.Queue(
            max_pending_batches
        )
        self._lock = threading.Lock()
        self.num_published_blocks = 0
        """Blocks the store accepted."""
        self.num_dropped_blocks = 0
        """Blocks not published: the queue was full, or the store failed."""
        self._thread = threading.Thread(target=self._run, name="block-publisher", daemon=True)
        self._thread.start()

    def submit(self, blocks: Sequence[tuple[BlockHash, torch.Tensor]]) -> None:
        """Queues blocks (payloads the caller no longer touches) for the store."""
        try:
            self._queue.put_nowait(list(blocks))
        except queue.Full:
            self._count(dropped=len(blocks))

    def flush(self, timeout_s: float) -> bool:
        """Waits (at most `timeout_s`) until everything submitted has been handled."""
        done = threading.Event()
        with self._queue.all_tasks_done:
            if self._queue.unfinished_tasks == 0:
                return True
        waiter = threading.Thread(target=lambda: (self._queue.join(), done.set()), daemon=True)
        waiter.start()
        return done.wait(timeout_s)

    def stop(self, timeout_s: float = 5.0) -> None:
        """Publishes what is queued (within `timeout_s`), then ends the thread."""
        self.flush(timeout_s)
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            return  # the thread is stuck in the store; it is a daemon
        self._thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            batch = self._queue.get()
            try:
                if batch is None:
                    return
                self.store.put([(h, kv.contiguous()) for h, kv in batch])
                self._count(published=len(batch))
            except (StoreUnavailableError, ValueError) as err:
                log.warning("could not publish %d computed blocks: %s", len(batch), err)
                self._count(dropped=len(batch))
            finally:
                self._queue.task_done()

    def _count(self, published: int = 0, dropped: int = 0) -> None:
        with self._lock:
            self.num_published_blocks += published
            self.num_dropped_blocks += dropped
