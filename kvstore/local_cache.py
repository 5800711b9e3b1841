"""A worker-local LRU of blocks in front of a shared store."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.hashing import BlockHash
from kvstore.lru import ByteBudgetLRU
from kvstore.stats import StatsRecorder, StoreStats
from kvstore.store import KVStore


class LocalCachedStore(KVStore):
    """Serves `lookup` and `get` from process memory when it can, else from `backend`.

    - Blocks are immutable and named by their hash, so a local copy can never be
      stale; it can only outlive the backend's copy, which is harmless.
    - `put` writes through: the backend first (its errors propagate and nothing
      is cached), then the local cache. `get` caches what it fetched.
    - A `lookup` or `get` answered entirely locally makes no backend call, so it
      succeeds even while the backend is unavailable.
    - Tails are request-scoped and read once, so they bypass the cache.
    - `stats()` counts what callers of this store saw (`hits` includes local
      hits; `num_local_hits` says how many), plus the backend's `corrupt_blocks`
      and `errors`. Thread-safe if the backend is.
    """

    def __init__(self, backend: KVStore, budget_bytes: int) -> None:
        super().__init__(backend.spec)
        self.backend = backend
        self._blocks: ByteBudgetLRU[BlockHash, torch.Tensor] = ByteBudgetLRU(budget_bytes)
        self._stats = StatsRecorder()
        self._local_stats = StatsRecorder()

    @property
    def num_local_hits(self) -> int:
        """Blocks served from the local cache."""
        return self._local_stats.snapshot().hits

    def lookup(self, hashes: Sequence[BlockHash]) -> int:
        num_local = 0
        while num_local < len(hashes) and self._blocks.contains(hashes[num_local]):
            num_local += 1
        if num_local == len(hashes):
            return num_local
        return num_local + self.backend.lookup(hashes[num_local:])

    def put(self, blocks: Sequence[tuple[BlockHash, torch.Tensor]]) -> None:
        self.backend.put(blocks)
        for block_hash, kv in blocks:
            self._blocks.put(block_hash, kv.detach().to("cpu", copy=True), self.spec.nbytes)
        self._stats.add(bytes_in=len(blocks) * self.spec.nbytes)

    def _get_blocks(
        self, hashes: Sequence[BlockHash], out: list[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        local = [self._blocks.get(block_hash) for block_hash in hashes]
        blocks: list[torch.Tensor | None] = [
            None if kv is None else (kv.clone() if dest is None else dest.copy_(kv))
            for kv, dest in zip(local, out, strict=True)
        ]
        missing = [i for i, kv in enumerate(local) if kv is None]
        if missing:
            fetched = self.backend.get([hashes[i] for i in missing])
            for i, kv in zip(missing, fetched, strict=True):
                if kv is not None:
                    self._blocks.put(hashes[i], kv.clone(), self.spec.nbytes)
                    if out[i] is not None:
                        kv = out[i].copy_(kv)
                blocks[i] = kv
        num_hits = sum(kv is not None for kv in blocks)
        self._local_stats.add(hits=len(hashes) - len(missing))
        self._stats.add(
            hits=num_hits, misses=len(hashes) - num_hits, bytes_out=num_hits * self.spec.nbytes
        )
        return blocks

    def put_tail(self, request_id: str, kv: torch.Tensor, prompt_hash: BlockHash) -> None:
        self.backend.put_tail(request_id, kv, prompt_hash)
        self._stats.add(bytes_in=kv.nbytes)

    def get_tail(self, request_id: str, prompt_hash: BlockHash) -> torch.Tensor | None:
        kv = self.backend.get_tail(request_id, prompt_hash)
        if kv is None:
            self._stats.add(misses=1)
        else:
            self._stats.add(hits=1, bytes_out=kv.nbytes)
        return kv

    def delete_tail(self, request_id: str) -> None:
        self.backend.delete_tail(request_id)

    def num_tails(self) -> int:
        return self.backend.num_tails()

    def stats(self) -> StoreStats:
        own, backend = self._stats.snapshot(), self.backend.stats()
        return StoreStats(
            hits=own.hits,
            misses=own.misses,
            bytes_in=own.bytes_in,
            bytes_out=own.bytes_out,
            corrupt_blocks=backend.corrupt_blocks,
            errors=backend.errors,
        )

    @property
    def is_authenticated(self) -> bool:
        return self.backend.is_authenticated

    def is_healthy(self) -> bool:
        return self.backend.is_healthy()

    def close(self) -> None:
        self.backend.close()
