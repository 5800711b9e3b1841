"""Publishing a prompt's K/V for a caller that may go away while it is published.

The put runs in a thread; a cancelled gRPC handler (client cancel, deadline,
stop) cannot stop that thread, and once the caller is gone no decode worker will
take the request's tail. Without this, a tail put after the router gave up (and
after its `Release`, which found nothing yet) would live out its whole TTL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

import torch

from kvstore import BlockHash, KVStore, StoreUnavailableError
from prefill_worker.store_io import publish_prompt_kv

log = logging.getLogger(__name__)


class TailHandoff:
    """Publishes prompts' K/V off the event loop, deleting the tail of any request
    whose caller left before the put was through. Keeps the deletions it starts
    alive until they finish (`num_pending`)."""

    def __init__(self, store: KVStore) -> None:
        self.store = store
        self._pending: set[asyncio.Future] = set()

    @property
    def num_pending(self) -> int:
        """Deletions (and the puts they wait for) still running."""
        return len(self._pending)

    async def publish(
        self,
        request_id: str,
        block_hashes: Sequence[BlockHash],
        kv: torch.Tensor,
        first_block: int,
        with_tail: bool,
    ) -> None:
        """`publish_prompt_kv` in a thread. Raises StoreUnavailableError, or
        CancelledError if the caller went away (the tail is then deleted once the
        put is through)."""
        publishing = asyncio.ensure_future(
            asyncio.to_thread(
                publish_prompt_kv, self.store, request_id, block_hashes, kv, first_block, with_tail
            )
        )
        try:
            await asyncio.shield(publishing)
        except asyncio.CancelledError:
            self._track(publishing)
            if with_tail:
                publishing.add_done_callback(lambda _: self._discard_tail(request_id))
            raise

    def _discard_tail(self, request_id: str) -> None:
        self._track(asyncio.ensure_future(asyncio.to_thread(self._delete_tail, request_id)))

    def _delete_tail(self, request_id: str) -> None:
        try:
            self.store.delete_tail(request_id)
        except StoreUnavailableError as err:
            log.warning("tail of cancelled request %s left to its TTL: %s", request_id, err)

    def _track(self, future: asyncio.Future) -> None:
        self._pending.add(future)
        future.add_done_callback(self._untrack)

    def _untrack(self, future: asyncio.Future) -> None:
        self._pending.discard(future)
        if not future.cancelled() and future.exception() is not None:
            # Nobody awaits it any more (its caller left): log instead of losing it.
            log.warning("publishing for a cancelled request failed: %s", future.exception())
