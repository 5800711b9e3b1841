"""`TailLease`: who deletes a request's tail, and when.

A prompt whose length is not a multiple of the block size ends in a partial block,
its *tail*. Full blocks are shared by hash and live until the store evicts them;
a tail belongs to one request and is stored under its id for one decode worker to
read once. If the request ends anywhere else (the first token finished it, the
client left, a deadline passed, a worker failed), somebody must delete the tail,
or it lives out the store's tail TTL.

At every moment exactly one service is the owner that deletes it, and each holds
a `TailLease` for its phase (the table is in docs/architecture.md):

1. the prefill worker, while it writes the tail and until its answer is sent;
2. the router, from sending Prefill until a decode worker's first message says
   that worker took the tail;
3. the decode worker, which deletes the tail right after reading it.

The router's lease starts before the Prefill call because the worker's answer can
be lost after the worker let go of the tail; a delete is idempotent, so that
overlap costs nothing. A crash in any phase leaves the tail to the store's TTL.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class _State(enum.Enum):
    HELD = "held"
    HANDED_OVER = "handed over"
    RELEASED = "released"


class TailLease:
    """One owner's hold on one request's tail.

    Contract:
    - `release()` deletes the tail (calls `delete`) unless the lease was handed over
      or released before: `delete` runs at most once in a lease's life. It never
      raises: a failed delete is logged, and the store's TTL ends the tail.
    - A release while the tail is being written (between `begin_write()` and
      `end_write()`) is deferred: `delete` runs when the last write ends, on the
      writer's thread. So a tail whose write finishes after its request ended is
      still deleted, and never before it exists.
    - `hand_over()` says the next owner has the tail; this lease then never deletes
      it. It returns False, changing nothing, after a release.
    - As a context manager the lease releases on exit unless it was handed over.
    - Thread-safe. `delete` must not block an event loop if `release` runs on one.
    """

    def __init__(self, delete: Callable[[], object], name: str = "") -> None:
        self._delete = delete
        self.name = name
        """What the lease is for (the tail's request id), for logs."""
        self._lock = threading.Lock()
        self._state = _State.HELD
        self._num_writes = 0
        self._is_delete_pending = False

    @property
    def is_held(self) -> bool:
        """Neither handed over nor released: ending the request now deletes the tail."""
        return self._state is _State.HELD

    @property
    def is_released(self) -> bool:
        return self._state is _State.RELEASED

    def hand_over(self) -> bool:
        """The next owner took the tail. Returns whether this lease still held it."""
        with self._lock:
            if self._state is not _State.HELD:
                return False
            self._state = _State.HANDED_OVER
            return True

    def release(self) -> None:
        """Deletes the tail now, or when the write in progress ends (see the class)."""
        with self._lock:
            if self._state is not _State.HELD:
                return
            self._state = _State.RELEASED
            if self._num_writes:
                self._is_delete_pending = True
                return
        self._run_delete()

    def begin_write(self) -> None:
        """Called before the tail is stored (on the caller's thread, so that a
        release that comes first cannot miss the write)."""
        with self._lock:
            self._num_writes += 1

    def end_write(self) -> None:
        """Called once the store call ended, whatever its outcome; runs a release
        that came during the write."""
        with self._lock:
            assert self._num_writes > 0, "end_write without begin_write"
            self._num_writes -= 1
            run = self._is_delete_pending and self._num_writes == 0
            if run:
                self._is_delete_pending = False
        if run:
            self._run_delete()

    def __enter__(self) -> TailLease:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def _run_delete(self) -> None:
        try:
            self._delete()
        except Exception as err:  # the TTL is the backstop; the caller has moved on
            log.warning("tail %s left to the store's TTL: %s", self.name, err)
