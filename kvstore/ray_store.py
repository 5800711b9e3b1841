"""`ray`: blocks in the Ray object store, indexed by one named actor per model.

Each block's payload is `ray.put` as a uint8 numpy array viewing the tensor: the
put copies the bytes once into shared memory, and `ray.get` on the same node
returns a zero-copy view of it (measured on this machine: a numpy payload reads
back ~5x faster than `bytes`, which Ray copies on get). The 80-byte codec header
lives in the index actor beside the ref, so the object store holds exactly what
the raw `ray.put` of an array would. The index maps block hash → `(header,
[ObjectRef])` (the ref wrapped in a list so Ray passes the ref instead of
resolving it); holding the ref keeps the object alive, dropping it (LRU past the
budget) frees it.

Lifetime: Ray >= 2.56 removed `ray.put(_owner=...)`, so every object is owned by
the process that put it and is lost when that process exits, whatever the index
says. A lost block is found on `get` (Ray raises `ObjectLostError`/`OwnerDiedError`),
counted as a miss and dropped from the index; `lookup` can count such a block as
present until then. (A process that already read a block may keep being served
its own cached copy; blocks are immutable, so that copy is still right.) Blocks written by a long-lived worker therefore live as long as
that worker.

Only `bytes` and uint8 numpy arrays are stored; Ray's own serialization carries
them, and the codec checks every header and payload on the way out.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np
import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from kvstore.codec import BlockCodec, BlockCodecError, tail_key
from kvstore.hashing import BlockHash
from kvstore.lru import ByteBudgetLRU
from kvstore.spec import BlockSpec
from kvstore.stats import StatsRecorder, StoreStats
from kvstore.store import KVStore, StoreUnavailableError
from kvstore.tail_table import ExpiringTable

DEFAULT_NAMESPACE = "kvrelay"
DEFAULT_BUDGET_BYTES = 4 << 30
DEFAULT_TAIL_TTL_S = 60.0
DEFAULT_TIMEOUT_S = 10.0

# (codec header, [ObjectRef] of the payload): the ref sits in a list so that Ray
# ships the ref itself to and from the index actor, instead of resolving it.
IndexEntry = tuple[bytes, list]


class BlockIndex:
    """The index actor's state: hash → entry (byte-budgeted LRU) and tails.

    Runs as a Ray actor (one per fingerprint and namespace); plain methods so the
    logic is testable without Ray.
    """

    def __init__(self, budget_bytes: int, tail_ttl_s: float) -> None:
        self._blocks: ByteBudgetLRU[BlockHash, IndexEntry] = ByteBudgetLRU(budget_bytes)
        self._tails: ExpiringTable[IndexEntry] = ExpiringTable(tail_ttl_s)

    def ping(self) -> bool:
        return True

    def lookup(self, hashes: Sequence[BlockHash]) -> int:
        num_present = 0
        for block_hash in hashes:
            if not self._blocks.contains(block_hash):
                break
            num_present += 1
        return num_present

    def put(self, entries: Sequence[tuple[BlockHash, IndexEntry]], num_bytes: int) -> None:
        for block_hash, entry in entries:
            # Idempotent: keep the first copy, so concurrent writers of the same
            # block do not keep replacing (and freeing) each other's objects.
            if self._blocks.get(block_hash) is None:
                self._blocks.put(block_hash, entry, num_bytes)

    def get(self, hashes: Sequence[BlockHash]) -> list[IndexEntry | None]:
        return [self._blocks.get(block_hash) for block_hash in hashes]

    def forget(self, hashes: Sequence[BlockHash]) -> None:
        for block_hash in hashes:
            self._blocks.pop(block_hash)

    def put_tail(self, request_id: str, entry: IndexEntry, ttl_s: float) -> None:
        self._tails.put(request_id, entry, ttl_s)

    def get_tail(self, request_id: str) -> IndexEntry | None:
        return self._tails.get(request_id)

    def delete_tail(self, request_id: str) -> None:
        self._tails.delete(request_id)

    def num_tails(self) -> int:
        return len(self._tails)

    def num_blocks(self) -> int:
        return len(self._blocks)

    def clear(self) -> None:
        """Drops every block and tail (an operator's reset; tests use it between cases)."""
        for block_hash in self._blocks.lru_order():
            self._blocks.pop(block_hash)
        for request_id in self._tails.request_ids():
            self._tails.delete(request_id)


class RayStore(KVStore):
    """Blocks in the Ray object store of the cluster this process is connected to.

    Connects with `ray.init()` (honouring `RAY_ADDRESS`) if Ray is not initialized
    yet. The index actor is named `kvrelay-kvindex-<fingerprint hex>` in Ray
    namespace `namespace`, created by the first store that asks for it
    (`num_cpus=0`, so it never takes a worker's CPU). It is detached by default:
    a non-detached actor dies with the handles of the process that created it,
    which would wipe the index shared by every worker when one of them stops.
    `budget_bytes` is the index's byte budget, fixed by whoever creates the actor;
    `tail_ttl_s` applies to the tails this store object writes. Every Ray call is
    bounded by `timeout_s`; a timeout or a dead actor raises
    `StoreUnavailableError`, and the next call looks the actor up again (a
    restarted index starts empty). Thread-safe.
    """

    def __init__(
        self,
        spec: BlockSpec,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        budget_bytes: int = DEFAULT_BUDGET_BYTES,
        tail_ttl_s: float = DEFAULT_TAIL_TTL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        is_detached: bool = True,
    ) -> None:
        super().__init__(spec)
        if not ray.is_initialized():
            ray.init()
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.tail_ttl_s = tail_ttl_s
        self._actor_name = f"kvrelay-kvindex-{spec.fingerprint.hex()}"
        self._actor_options = {
            "name": self._actor_name,
            "namespace": namespace,
            "get_if_exists": True,
            "num_cpus": 0,
            "lifetime": "detached" if is_detached else None,
        }
        self._actor_args = (budget_bytes, DEFAULT_TAIL_TTL_S)
        self._codec = BlockCodec(spec)
        self._stats = StatsRecorder()
        self._lock = threading.Lock()
        self._actor: ray.actor.ActorHandle | None = None

    def lookup(self, hashes: Sequence[BlockHash]) -> int:
        return self._call("lookup", list(hashes)) if hashes else 0

    def put(self, blocks: Sequence[tuple[BlockHash, torch.Tensor]]) -> None:
        for _, kv in blocks:
            self.spec.check_payload(kv)
        if not blocks:
            return
        entries = [(h, self._put_object(h, kv)) for h, kv in blocks]
        self._call("put", entries, self.spec.nbytes)
        self._stats.add(bytes_in=len(blocks) * self.spec.nbytes)

    def get(self, hashes: Sequence[BlockHash]) -> list[torch.Tensor | None]:
        return self._get(hashes, [None] * len(hashes))

    def get_into(self, hashes: Sequence[BlockHash], out: Sequence[torch.Tensor]) -> list[bool]:
        if len(out) != len(hashes):
            raise ValueError(f"{len(hashes)} hashes but {len(out)} output tensors")
        return [kv is not None for kv in self._get(hashes, list(out))]

    def _get(
        self, hashes: Sequence[BlockHash], out: list[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        if not hashes:
            return []
        entries = self._call("get", list(hashes))
        refs = [entry[1][0] for entry in entries if entry is not None]
        payloads = iter(self._fetch(refs))
        blocks: list[torch.Tensor | None] = []
        lost: list[BlockHash] = []
        for block_hash, entry, dest in zip(hashes, entries, out, strict=True):
            payload = None if entry is None else next(payloads)
            if entry is not None and payload is None:
                lost.append(block_hash)
            header = None if entry is None else entry[0]
            blocks.append(self._decode(header, payload, block_hash, is_tail=False, out=dest))
        if lost:
            self._call("forget", lost)
        return blocks

    def put_tail(self, request_id: str, kv: torch.Tensor) -> None:
        self.spec.check_payload(kv, is_tail=True)
        entry = self._put_object(tail_key(request_id), kv)
        self._call("put_tail", request_id, entry, self.tail_ttl_s)
        self._stats.add(bytes_in=kv.nbytes)

    def get_tail(self, request_id: str) -> torch.Tensor | None:
        entry = self._call("get_tail", request_id)
        if entry is None:
            return self._decode(None, None, tail_key(request_id), is_tail=True, out=None)
        payload = self._fetch([entry[1][0]])[0]
        return self._decode(entry[0], payload, tail_key(request_id), is_tail=True, out=None)

    def delete_tail(self, request_id: str) -> None:
        self._call("delete_tail", request_id)

    def num_tails(self) -> int:
        return self._call("num_tails")

    def num_blocks(self) -> int:
        """Blocks in the index now (tests use it to check eviction)."""
        return self._call("num_blocks")

    def stats(self) -> StoreStats:
        return self._stats.snapshot()

    def is_healthy(self) -> bool:
        try:
            return ray.is_initialized() and self._call("ping")
        except StoreUnavailableError:
            return False

    def clear_index(self) -> None:
        """Drops every block and tail of this fingerprint from the shared index."""
        self._call("clear")

    def close(self) -> None:
        # The index actor is shared with other stores; only our handle goes.
        with self._lock:
            self._actor = None

    def _put_object(self, key: BlockHash, kv: torch.Tensor) -> IndexEntry:
        header, payload = self._codec.encode(key, kv)
        return header, [ray.put(np.frombuffer(payload, dtype=np.uint8))]

    def _fetch(self, refs: list[ray.ObjectRef]) -> list[np.ndarray | None]:
        """The objects behind `refs`; `None` for one whose owner is gone."""
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except GetTimeoutError as exc:
            self._stats.add(errors=1)
            raise StoreUnavailableError(f"Ray object store timed out: {exc}") from exc
        except RayError:
            pass
        # Some object was lost: fetch one by one to tell which.
        objects = []
        for ref in refs:
            try:
                objects.append(ray.get(ref, timeout=self.timeout_s))
            except GetTimeoutError as exc:
                self._stats.add(errors=1)
                raise StoreUnavailableError(f"Ray object store timed out: {exc}") from exc
            except RayError:
                objects.append(None)
        return objects

    def _decode(
        self,
        header: bytes | None,
        payload: np.ndarray | None,
        key: BlockHash,
        *,
        is_tail: bool,
        out: torch.Tensor | None,
    ) -> torch.Tensor | None:
        if header is None or payload is None:
            self._stats.add(misses=1)
            return None
        try:
            kv = self._codec.decode_parts(header, payload, key, is_tail=is_tail, out=out)
        except BlockCodecError:
            self._stats.add(misses=1, corrupt_blocks=1)
            return None
        self._stats.add(hits=1, bytes_out=kv.nbytes)
        return kv

    def _call(self, method: str, *args: object) -> object:
        """Calls the index actor and waits at most `timeout_s`."""
        try:
            actor = self._index()
            return ray.get(getattr(actor, method).remote(*args), timeout=self.timeout_s)
        except (GetTimeoutError, RayActorError) as exc:
            with self._lock:
                self._actor = None  # look it up (or recreate it) next time
            self._stats.add(errors=1)
            raise StoreUnavailableError(f"Ray KV index unavailable: {exc}") from exc

    def _index(self) -> ray.actor.ActorHandle:
        with self._lock:
            if self._actor is None:
                self._actor = (
                    ray.remote(BlockIndex).options(**self._actor_options).remote(*self._actor_args)
                )
            return self._actor
