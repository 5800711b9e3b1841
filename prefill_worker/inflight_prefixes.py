"""Prefix blocks this worker is computing right now.

Prompts that share a prefix often arrive together (one system prompt, many
questions). Without coordination each would miss the store and compute the same
blocks. Instead, a request first waits for any of its blocks that an earlier
request is computing, then claims the rest; after its store lookup it releases
the blocks the store already had, and the others once they are published (or its
work ended otherwise). A waiter then finds the shared blocks in the store.
Event-loop only; never held across another request's claim, so it cannot deadlock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from kvstore.hashing import BlockHash


class PrefixClaim:
    """The blocks one request computes; released at most once each."""

    def __init__(self, owner: InflightPrefixes, hashes: Sequence[BlockHash]) -> None:
        self._owner = owner
        self._hashes = list(hashes)

    def release_leading(self, num_blocks: int) -> None:
        """Releases the first `num_blocks` claimed blocks (the store had them)."""
        self._owner._release(self._hashes[:num_blocks])
        self._hashes = self._hashes[num_blocks:]

    def release_all(self) -> None:
        self._owner._release(self._hashes)
        self._hashes = []


class InflightPrefixes:
    def __init__(self) -> None:
        self._computing: dict[BlockHash, asyncio.Future[None]] = {}

    @property
    def num_blocks(self) -> int:
        return len(self._computing)

    @asynccontextmanager
    async def claim(self, hashes: Sequence[BlockHash]) -> AsyncIterator[PrefixClaim]:
        """Waits until no block of `hashes` is being computed by another request,
        then claims them all for the caller until the block exits."""
        while waits := [self._computing[h] for h in hashes if h in self._computing]:
            await asyncio.wait(waits)
        loop = asyncio.get_running_loop()
        for block_hash in hashes:
            self._computing[block_hash] = loop.create_future()
        claim = PrefixClaim(self, hashes)
        try:
            yield claim
        finally:
            claim.release_all()

    def _release(self, hashes: Sequence[BlockHash]) -> None:
        for block_hash in hashes:
            future = self._computing.pop(block_hash, None)
            if future is not None and not future.done():
                future.set_result(None)
