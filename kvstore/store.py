"""The `KVStore` interface every backend implements, and its error."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import torch

from kvstore.hashing import BlockHash
from kvstore.spec import BlockSpec
from kvstore.stats import StoreStats


class StoreUnavailableError(RuntimeError):
    """The backend cannot be reached or refused the call (down, timed out, full).

    Raised quickly (within the backend's configured timeout). The prefill worker
    treats it as "no cached prefix"; the decode worker as a failed request.
    """


class KVStore(ABC):
    """A shared, prefix-aware store of KV blocks for one `BlockSpec`.

    Contract common to every backend:

    - Blocks are keyed by their chained hash (`kvstore.hashing`); a store opened
      for one spec never returns a block of another (keys and headers carry the
      spec's fingerprint).
    - Stored blocks are immutable: `put` of an existing hash is a no-op for the
      content (the hash names the tokens, so the content is the same) and may
      refresh its lifetime. Blocks may disappear at any time (eviction, TTL,
      restart); a vanished block is a miss, never an error.
    - A stored payload that fails validation is a miss, counted in
      `stats().corrupt_blocks`; it is never returned.
    - Each batched call is one round trip to the backend, but is *not* atomic
      across its blocks: a concurrent reader may see some of a batch's blocks
      before the others. Every single block is written and read atomically.
    - Returned tensors are new CPU tensors owned by the caller; the store keeps no
      reference to them, and tensors passed in may be reused once the call returns.
    - Every method is safe to call from several threads at once.
    - Backend failures raise `StoreUnavailableError` from `lookup`, `put`, `get`
      and the tail methods, within the configured timeout. `is_healthy`,
      `stats` and `close` never raise it.
    """

    def __init__(self, spec: BlockSpec) -> None:
        self.spec = spec

    @abstractmethod
    def lookup(self, hashes: Sequence[BlockHash]) -> int:
        """Number of leading `hashes` present, in one round trip. Mutates nothing.

        A later `get` may still miss (the block can be evicted in between).
        """

    @abstractmethod
    def put(self, blocks: Sequence[tuple[BlockHash, torch.Tensor]]) -> None:
        """Stores full blocks (`spec.shape`, `spec.dtype`); batched and idempotent.

        Raises `ValueError` for a tensor of the wrong shape or dtype (before
        anything is written).
        """

    def get(self, hashes: Sequence[BlockHash]) -> list[torch.Tensor | None]:
        """The blocks for `hashes` in order, `None` for each missing or corrupt one."""
        return self._get_blocks(hashes, [None] * len(hashes))

    def get_into(self, hashes: Sequence[BlockHash], out: Sequence[torch.Tensor]) -> list[bool]:
        """Like `get`, but decodes block `i` into `out[i]` (any device, `spec.shape`).

        Returns which blocks were found; `out[i]` is left untouched for a miss.
        """
        if len(out) != len(hashes):
            raise ValueError(f"{len(hashes)} hashes but {len(out)} output tensors")
        return [kv is not None for kv in self._get_blocks(hashes, list(out))]

    @abstractmethod
    def _get_blocks(
        self, hashes: Sequence[BlockHash], out: list[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        """What `get` and `get_into` share: block `i` lands in `out[i]` when that is a
        tensor (left untouched on a miss) and in a new CPU tensor when it is `None`.
        Returns the tensor each block landed in, `None` for a miss or a corrupt block.
        Backends decode straight into `out[i]` where they can, skipping a copy.
        """

    @abstractmethod
    def put_tail(self, request_id: str, kv: torch.Tensor, prompt_hash: BlockHash) -> None:
        """Stores a request's partial last block, `[L, 2, n, H, D]` with 0 < n <= block_size,
        bound to the prompt it ends (`prompt_hash`, `kvstore.hashing.hash_prompt`).

        Overwrites an earlier tail of the same request. The tail expires by itself
        after the store's tail TTL, so a crashed request leaks nothing for long.
        """

    @abstractmethod
    def get_tail(self, request_id: str, prompt_hash: BlockHash) -> torch.Tensor | None:
        """The request's tail, or `None` if absent, expired, corrupt, or stored for
        another prompt than `prompt_hash`. Mutates nothing."""

    @abstractmethod
    def delete_tail(self, request_id: str) -> None:
        """Drops the request's tail; a no-op if there is none."""

    @abstractmethod
    def num_tails(self) -> int:
        """Live request-scoped keys of this store's fingerprint (for leak checks)."""

    @abstractmethod
    def stats(self) -> StoreStats:
        """A snapshot of this store object's counters."""

    @property
    def is_authenticated(self) -> bool:
        """Whether blocks this store writes and reads carry the cluster's MAC."""
        return False

    @abstractmethod
    def is_healthy(self) -> bool:
        """Whether the backend answers now (one quick probe); never raises."""

    @abstractmethod
    def close(self) -> None:
        """Releases connections and handles; the store must not be used afterwards.

        Idempotent. Blocks already stored in a shared backend stay there.
        """

    def __enter__(self) -> KVStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
