"""`ray`: blocks in the Ray object store, indexed by one named actor per model.

Each `put` is one object holding the whole batch (`kvstore.block_batch`: why,
and its layout). `ray.get` on the same node returns the payloads as zero-copy
views of shared memory; the codec checks each header and checksum before the
block is copied into the caller's tensor.

References: the index actor (`kvstore.ray_index`) holds the ref of every
indexed object; its byte budget evicts whole objects. Each store object also
keeps a ref cache, an `ObjectIndex` of the objects it put or located, with a
byte budget of its own (`ref_cache_bytes`): a `get` or `lookup` of blocks found
there makes no actor call (a prefill worker re-reading a prefix it wrote, a
worker reading a shared system prompt again). The price is memory: a cached ref
keeps its object alive after the index has evicted it, so the object store
holds at most `budget_bytes` plus every store's `ref_cache_bytes`.
`ref_cache_bytes=0` turns the cache off.

Lifetime: Ray >= 2.56 removed `ray.put(_owner=...)`, so every object is owned by
the process that put it and is lost when that process exits, whatever the index
says. A lost object is found on `get` (Ray raises `ObjectLostError` or
`OwnerDiedError`); its blocks count as misses and both the index and the ref
cache drop it. `lookup` can count such blocks as present until then. Blocks
written by a long-lived worker therefore live as long as that worker.

Objects hold only `bytes` and uint8 numpy arrays; Ray's own serialization
carries them, and the codec checks every header and payload on the way out.
Cross-node, `ray.get` pulls a whole batch object to the reader's node, even to
read one of its blocks; readers take a prompt's blocks together, so they use it.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import ray
import torch
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from kvstore.block_batch import pack_blocks, unpack_block
from kvstore.codec import BlockCodec, BlockCodecError, tail_key
from kvstore.hashing import BlockHash
from kvstore.object_index import Located, ObjectIndex, ObjectKey
from kvstore.ray_index import RayBlockIndex, object_key
from kvstore.spec import BlockSpec
from kvstore.stats import StatsRecorder, StoreStats
from kvstore.store import KVStore, StoreUnavailableError

DEFAULT_NAMESPACE = "kvrelay"
DEFAULT_BUDGET_BYTES = 4 << 30
DEFAULT_REF_CACHE_BYTES = 512 << 20
DEFAULT_TAIL_TTL_S = 60.0
DEFAULT_TIMEOUT_S = 10.0


class RayStore(KVStore):
    """Blocks in the Ray object store of the cluster this process is connected to.

    Connects with `ray.init()` (honouring `RAY_ADDRESS`) if Ray is not initialized
    yet. The index actor is named `kvrelay-kvindex-<fingerprint hex>` in Ray
    namespace `namespace`, created by the first store that asks for it
    (`num_cpus=0`, so it never takes a worker's CPU). It is detached by default:
    a non-detached actor dies with the handles of the process that created it,
    which would wipe the index shared by every worker when one of them stops.
    `budget_bytes` is the index's byte budget, fixed by whoever creates the actor;
    `ref_cache_bytes` bounds this store object's ref cache (module docstring);
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
        ref_cache_bytes: int = DEFAULT_REF_CACHE_BYTES,
        tail_ttl_s: float = DEFAULT_TAIL_TTL_S,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        is_detached: bool = True,
    ) -> None:
        super().__init__(spec)
        if ref_cache_bytes < 0:
            raise ValueError(f"ref_cache_bytes must be >= 0, got {ref_cache_bytes}")
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
        self._ref_cache: ObjectIndex[ray.ObjectRef] | None = (
            ObjectIndex(ref_cache_bytes) if ref_cache_bytes else None
        )
        self._stats = StatsRecorder()
        self._lock = threading.Lock()
        self._actor: ray.actor.ActorHandle | None = None

    def lookup(self, hashes: Sequence[BlockHash]) -> int:
        num_cached = self._ref_cache.num_leading(hashes) if self._ref_cache else 0
        if num_cached == len(hashes):
            return num_cached
        return num_cached + self._call("lookup", list(hashes[num_cached:]))

    def put(self, blocks: Sequence[tuple[BlockHash, torch.Tensor]]) -> None:
        for _, kv in blocks:
            self.spec.check_payload(kv)
        if not blocks:
            return
        hashes = [block_hash for block_hash, _ in blocks]
        num_bytes = len(blocks) * self.spec.nbytes
        ref = ray.put(pack_blocks(self._codec, blocks))
        # Synchronous, so that a put is visible to every reader when it returns.
        self._call("put", hashes, [ref], num_bytes)
        if self._ref_cache is not None:
            positions = [(block_hash, i) for i, block_hash in enumerate(hashes)]
            self._ref_cache.add(object_key(ref), ref, positions, num_bytes)
        self._stats.add(bytes_in=num_bytes)

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
        found = self._locate(hashes)
        refs = {object_key(entry.handle): entry.handle for entry in found if entry is not None}
        stored = dict(zip(refs, self._fetch(list(refs.values())), strict=True))
        blocks: list[torch.Tensor | None] = []
        for block_hash, entry, dest in zip(hashes, found, out, strict=True):
            batch = None if entry is None else stored[object_key(entry.handle)]
            if batch is None:
                blocks.append(self._miss())
            else:
                blocks.append(self._decode(batch, entry.position, block_hash, dest))
        lost = [key for key, obj in stored.items() if obj is None]
        if lost:
            self._forget(lost)
        return blocks

    def put_tail(self, request_id: str, kv: torch.Tensor) -> None:
        self.spec.check_payload(kv, is_tail=True)
        ref = ray.put(pack_blocks(self._codec, [(tail_key(request_id), kv)]))
        self._call("put_tail", request_id, [ref], self.tail_ttl_s)
        self._stats.add(bytes_in=kv.nbytes)

    def get_tail(self, request_id: str) -> torch.Tensor | None:
        ref = self._call("get_tail", request_id)
        stored = None if ref is None else self._fetch(ref)[0]
        if stored is None:
            return self._miss()
        return self._decode(stored, 0, tail_key(request_id), None, is_tail=True)

    def delete_tail(self, request_id: str) -> None:
        self._call("delete_tail", request_id)

    def num_tails(self) -> int:
        return self._call("num_tails")

    def num_blocks(self) -> int:
        """Blocks in the index now (tests use it to check eviction)."""
        return self._call("num_blocks")

    @property
    def num_cached_refs(self) -> int:
        """Blocks this store object can find without asking the index."""
        return 0 if self._ref_cache is None else len(self._ref_cache)

    def stats(self) -> StoreStats:
        return self._stats.snapshot()

    def is_healthy(self) -> bool:
        try:
            return ray.is_initialized() and self._call("ping")
        except StoreUnavailableError:
            return False

    def clear_index(self) -> None:
        """Drops every block and tail of this fingerprint from the shared index,
        and this store object's ref cache (other stores keep theirs)."""
        self._call("clear")
        if self._ref_cache is not None:
            self._ref_cache.clear()

    def close(self) -> None:
        # The index actor is shared with other stores; only our handle and refs go.
        if self._ref_cache is not None:
            self._ref_cache.clear()
        with self._lock:
            self._actor = None

    def _locate(self, hashes: Sequence[BlockHash]) -> list[Located[ray.ObjectRef] | None]:
        """Where each block is: from the ref cache, then one index call for the rest."""
        found = self._ref_cache.locate(hashes) if self._ref_cache else [None] * len(hashes)
        missing = [i for i, entry in enumerate(found) if entry is None]
        if not missing:
            return found
        objects, locations = self._call("locate", [hashes[i] for i in missing])
        for i, location in zip(missing, locations, strict=True):
            if location is not None:
                ref, object_bytes = objects[location[0]]
                found[i] = Located(ref, location[1], object_bytes)
        if self._ref_cache is not None:
            self._cache_refs([(hashes[i], found[i]) for i in missing if found[i] is not None])
        return found

    def _cache_refs(self, located: list[tuple[BlockHash, Located[ray.ObjectRef]]]) -> None:
        """Adds what the index located to the ref cache, one entry per object."""
        assert self._ref_cache is not None
        entry_of: dict[ObjectKey, Located[ray.ObjectRef]] = {}
        blocks_of: dict[ObjectKey, list[tuple[BlockHash, int]]] = {}
        for block_hash, entry in located:
            key = object_key(entry.handle)
            entry_of[key] = entry
            blocks_of.setdefault(key, []).append((block_hash, entry.position))
        for key, blocks in blocks_of.items():
            entry = entry_of[key]
            self._ref_cache.add(key, entry.handle, blocks, entry.object_bytes)

    def _forget(self, keys: list[ObjectKey]) -> None:
        """Drops lost objects here and in the index."""
        if self._ref_cache is not None:
            self._ref_cache.forget(keys)
        self._call("forget", keys)

    def _fetch(self, refs: list[ray.ObjectRef]) -> list[object | None]:
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
        stored: object,
        position: int,
        key: BlockHash,
        out: torch.Tensor | None,
        *,
        is_tail: bool = False,
    ) -> torch.Tensor | None:
        """Block `position` of `stored`, checked, into `out` (or a new tensor);
        `None`, counted as corrupt, if it is not the block `key` names."""
        try:
            header, payload = unpack_block(stored, position)
            kv = self._codec.decode_parts(header, payload, key, is_tail=is_tail, out=out)
        except BlockCodecError:
            self._stats.add(misses=1, corrupt_blocks=1)
            return None
        self._stats.add(hits=1, bytes_out=kv.nbytes)
        return kv

    def _miss(self) -> None:
        """Counts a block (or tail) that is absent or lost; returns the `None` it reads as."""
        self._stats.add(misses=1)
        return None

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
                    ray.remote(RayBlockIndex)
                    .options(**self._actor_options)
                    .remote(*self._actor_args)
                )
            return self._actor
