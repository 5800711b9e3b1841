"""Publishing a prompt's K/V for a caller that may go away while it is published.

The put runs in a thread, and a cancelled gRPC handler (client cancel, deadline,
shutdown) cannot stop that thread. The tail it writes is this worker's to delete
until its answer is sent (phase 1 of `kvstore.tail_lease`): each publication holds
a `TailLease` that is released if the caller left or the put failed, and whose
delete waits for the write to end, so a tail written after its caller left is
deleted at once instead of living out its TTL.

Deletes run in threads of their own, so neither the event loop nor a cancelled
handler waits for the store; `wait_idle` lets the worker wait for them (and the
puts) before it closes the store.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Sequence

import torch

from kvstore import BlockHash, KVStore, StoreUnavailableError
from kvstore.tail_lease import TailLease
from prefill_worker.store_io import publish_prompt_kv

log = logging.getLogger(__name__)


class TailHandoff:
    """Publishes prompts' K/V in threads and owns their tails while they are written.
    `publish` and `release` run on the event loop; the rest is thread-safe."""

    def __init__(self, store: KVStore) -> None:
        self.store = store
        self._idle = threading.Condition()
        self._num_running = 0
        self._writing: dict[str, TailLease] = {}  # by request id; event loop only

    @property
    def num_running(self) -> int:
        """Puts and tail deletions still running."""
        with self._idle:
            return self._num_running

    def wait_idle(self, timeout_s: float) -> bool:
        """Waits until nothing runs (at most `timeout_s`); returns whether it does."""
        with self._idle:
            return self._idle.wait_for(lambda: self._num_running == 0, timeout_s)

    async def publish(
        self,
        request_id: str,
        block_hashes: Sequence[BlockHash],
        kv: torch.Tensor,
        *,
        first_block: int,
        with_tail: bool,
        prompt_hash: BlockHash,
    ) -> None:
        """`publish_prompt_kv` in a thread. On return the tail (if any) is the
        caller's to hand on in its answer. Raises StoreUnavailableError, or
        CancelledError if the caller went away; either way the tail is deleted
        once the put is through."""
        delete = functools.partial(self._delete_in_thread, request_id)
        lease = TailLease(delete if with_tail else _nothing, request_id)
        put_kv = functools.partial(
            publish_prompt_kv,
            self.store,
            request_id,
            block_hashes,
            kv,
            first_block,
            with_tail,
            prompt_hash,
        )
        lease.begin_write()  # before the thread starts, so a release cannot miss it
        self._enter()
        self._writing[request_id] = lease
        put = asyncio.get_running_loop().run_in_executor(None, self._put, lease, put_kv)
        try:
            await asyncio.shield(put)
        except BaseException:  # cancelled, or the store failed
            put.add_done_callback(_retrieve_exception)  # the thread logs what matters
            lease.release()
            raise
        finally:
            self._writing.pop(request_id, None)
        lease.hand_over()

    def release(self, request_id: str) -> None:
        """Deletes a request's tail for the router (its `Release`): after the write
        in progress, if there is one; else now, in a thread."""
        lease = self._writing.pop(request_id, None)
        if lease is not None:
            lease.release()
        else:
            self._delete_in_thread(request_id)

    def _put(self, lease: TailLease, put_kv: functools.partial) -> None:
        try:
            put_kv()
        except Exception as err:
            if lease.is_released:  # nobody awaits the result any more
                log.warning("publishing for cancelled request %s failed: %s", lease.name, err)
            raise
        finally:
            lease.end_write()  # runs the delete if the caller left meanwhile
            self._exit()

    def _delete_in_thread(self, request_id: str) -> None:
        self._enter()
        threading.Thread(
            target=self._delete, args=(request_id,), name="tail-delete", daemon=True
        ).start()

    def _delete(self, request_id: str) -> None:
        try:
            self.store.delete_tail(request_id)
        except StoreUnavailableError as err:
            log.warning("tail of request %s left to its TTL: %s", request_id, err)
        finally:
            self._exit()

    def _enter(self) -> None:
        with self._idle:
            self._num_running += 1

    def _exit(self) -> None:
        with self._idle:
            self._num_running -= 1
            assert self._num_running >= 0
            self._idle.notify_all()


def _nothing() -> None:
    """The delete of a publication without a tail."""


def _retrieve_exception(future: asyncio.Future) -> None:
    """Marks a future's exception as seen (nobody awaits it once the caller left)."""
    if not future.cancelled():
        future.exception()
