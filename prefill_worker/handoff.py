"""Publishing a prompt's K/V for a caller that may go away while it is published.

The put runs in a thread, and a cancelled gRPC handler (client cancel, deadline,
shutdown) cannot stop that thread; once the caller is gone, no decode worker
will take the request's tail. Without this, a tail put after the router gave up
(and after its `Release`, which found nothing yet) would live out its whole TTL.

Whoever finishes last deletes the tail: the put's own thread, if the caller had
left before the put was through; otherwise the cancelled handler, in a thread of
its own. Neither needs the event loop afterwards, so this also holds while a
worker shuts down, and `wait_idle` lets it wait for them before it closes the store.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from kvstore import BlockHash, KVStore, StoreUnavailableError
from prefill_worker.store_io import publish_prompt_kv

log = logging.getLogger(__name__)


@dataclass
class _Publication:
    """One request's put, shared by its handler and its thread."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    has_caller_left: bool = False
    is_put_done: bool = False


class TailHandoff:
    """Publishes prompts' K/V in threads; a request whose caller left before the
    put was through loses its tail as soon as the put is. Thread-safe."""

    def __init__(self, store: KVStore) -> None:
        self.store = store
        self._idle = threading.Condition()
        self._num_running = 0

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
    ) -> None:
        """`publish_prompt_kv` in a thread. Raises StoreUnavailableError, or
        CancelledError if the caller went away (the tail is then deleted once
        the put is through)."""
        publication = _Publication()
        put_kv = functools.partial(
            publish_prompt_kv, self.store, request_id, block_hashes, kv, first_block, with_tail
        )
        self._enter()
        put = asyncio.get_running_loop().run_in_executor(
            None, self._put, publication, put_kv, request_id, with_tail
        )
        try:
            await asyncio.shield(put)
        except asyncio.CancelledError:
            put.add_done_callback(_retrieve_exception)  # the thread logs what matters
            with publication.lock:
                publication.has_caller_left = True
                is_put_done = publication.is_put_done
            if is_put_done and with_tail:
                # The put was through before we heard of it: the tail is ours to delete.
                self._enter()
                threading.Thread(
                    target=self._delete_tail, args=(request_id,), name="tail-delete", daemon=True
                ).start()
            raise

    def _put(
        self,
        publication: _Publication,
        put_kv: Callable[[], None],
        request_id: str,
        with_tail: bool,
    ) -> None:
        try:
            error: BaseException | None = None
            try:
                put_kv()
            except BaseException as exc:  # re-raised below unless nobody is left to hear it
                error = exc
            with publication.lock:
                publication.is_put_done = True
                has_caller_left = publication.has_caller_left
            if not has_caller_left:
                if error is not None:
                    raise error
                return
            if error is not None:
                log.warning("publishing for cancelled request %s failed: %s", request_id, error)
            if with_tail:
                self._delete_tail_now(request_id)
        finally:
            self._exit()

    def _delete_tail(self, request_id: str) -> None:
        try:
            self._delete_tail_now(request_id)
        finally:
            self._exit()

    def _delete_tail_now(self, request_id: str) -> None:
        try:
            self.store.delete_tail(request_id)
        except StoreUnavailableError as err:
            log.warning("tail of cancelled request %s left to its TTL: %s", request_id, err)

    def _enter(self) -> None:
        with self._idle:
            self._num_running += 1

    def _exit(self) -> None:
        with self._idle:
            self._num_running -= 1
            assert self._num_running >= 0
            self._idle.notify_all()


def _retrieve_exception(future: asyncio.Future) -> None:
    """Marks a future's exception as seen (nobody awaits it once the caller left)."""
    if not future.cancelled():
        future.exception()
