"""`memory`: an in-process `KVStore` with a byte budget and LRU eviction."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvstore.hashing import BlockHash
from kvstore.lru import ByteBudgetLRU
from kvstore.spec import BlockSpec
from kvstore.stats import StatsRecorder, StoreStats
from kvstore.store import KVStore
from kvstore.tail_table import ExpiringTable

DEFAULT_BUDGET_BYTES = 1 << 30
DEFAULT_TAIL_TTL_S = 60.0


class MemoryStore(KVStore):
    """Blocks held as private CPU tensors in this process (tests, single-process use).

    Payloads are copied in and out, never shared with callers, so no codec is
    needed (nothing crosses a process boundary). `lookup` does not refresh
    recency; `get` and `put` do. Never unavailable; thread-safe.
    """

    def __init__(
        self,
        spec: BlockSpec,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        tail_ttl_s: float = DEFAULT_TAIL_TTL_S,
    ) -> None:
        super().__init__(spec)
        self._blocks: ByteBudgetLRU[BlockHash, torch.Tensor] = ByteBudgetLRU(budget_bytes)
        # A tail with the hash of the prompt it was stored for.
        self._tails: ExpiringTable[tuple[BlockHash, torch.Tensor]] = ExpiringTable(tail_ttl_s)
        self._stats = StatsRecorder()

    def lookup(self, hashes: Sequence[BlockHash]) -> int:
        num_present = 0
        for block_hash in hashes:
            if not self._blocks.contains(block_hash):
                break
            num_present += 1
        return num_present

    def put(self, blocks: Sequence[tuple[BlockHash, torch.Tensor]]) -> None:
        for _, kv in blocks:
            self.spec.check_payload(kv)
        for block_hash, kv in blocks:
            self._blocks.put(block_hash, kv.detach().to("cpu", copy=True), self.spec.nbytes)
        self._stats.add(bytes_in=len(blocks) * self.spec.nbytes)

    def _get_blocks(
        self, hashes: Sequence[BlockHash], out: list[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        found = [self._blocks.get(block_hash) for block_hash in hashes]
        blocks = [_copy_out(kv, dest) for kv, dest in zip(found, out, strict=True)]
        num_hits = sum(kv is not None for kv in blocks)
        self._stats.add(
            hits=num_hits,
            misses=len(blocks) - num_hits,
            bytes_out=num_hits * self.spec.nbytes,
        )
        return blocks

    def put_tail(self, request_id: str, kv: torch.Tensor, prompt_hash: BlockHash) -> None:
        self.spec.check_payload(kv, is_tail=True)
        self._tails.put(request_id, (prompt_hash, kv.detach().to("cpu", copy=True)))
        self._stats.add(bytes_in=kv.nbytes)

    def get_tail(self, request_id: str, prompt_hash: BlockHash) -> torch.Tensor | None:
        stored = self._tails.get(request_id)
        if stored is None or stored[0] != prompt_hash:
            # Another prompt's tail counts as the codec stores count it: corrupt.
            self._stats.add(misses=1, corrupt_blocks=int(stored is not None))
            return None
        kv = stored[1]
        self._stats.add(hits=1, bytes_out=kv.nbytes)
        return kv.clone()

    def delete_tail(self, request_id: str) -> None:
        self._tails.delete(request_id)

    def num_tails(self) -> int:
        return len(self._tails)

    def num_blocks(self) -> int:
        """Blocks held now (tests use it to check eviction)."""
        return len(self._blocks)

    def stats(self) -> StoreStats:
        return self._stats.snapshot()

    def is_healthy(self) -> bool:
        return True

    def close(self) -> None:
        pass


def _copy_out(kv: torch.Tensor | None, dest: torch.Tensor | None) -> torch.Tensor | None:
    """A private copy of a held block: into `dest` when given, else a new tensor."""
    if kv is None:
        return None
    return kv.clone() if dest is None else dest.copy_(kv)
