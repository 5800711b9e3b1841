"""`ray`: blocks in the Ray object store, indexed by one named actor per model.

A `put` stores its blocks as few objects as it can (`kvstore.ray.block_batch`: why,
and the layout), at most `MAX_OBJECT_BYTES` each, and tells the index actor
(`kvstore.ray.index_actor`) in one call. `ray.get` on the same node returns the
payloads as zero-copy views of shared memory; the codec checks each header and
checksum before the block is copied into the caller's tensor. Each store object
also holds the refs of what it put and located (`kvstore.ray.ref_cache`), so a
repeated `get` needs no actor call.

Lifetime: Ray >= 2.56 removed `ray.put(_owner=...)`, so every object is owned by
the process that put it and is lost when that process exits, whatever the index
says. A `get` finds a lost object (`ObjectLostError`, `OwnerDiedError`): its
blocks are misses, and the index and the ref cache drop it, as they drop an
object with a corrupt block so that the next put replaces it. Until then
`lookup` counts its blocks as present.

Objects hold only `bytes` and uint8 numpy arrays; Ray's own serialization
carries them, and the codec checks every header and payload on the way out.
Cross-node, `ray.get` pulls a whole object to the reader's node, even to read one
of its blocks: `MAX_OBJECT_BYTES` bounds what such a read moves.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence

import ray
import torch
from ray.exceptions import ObjectFetchTimedOutError, ObjectLostError, RayError

from kvstore.codec import BlockCodec, BlockCodecError, tail_key
from kvstore.hashing import BlockHash
from kvstore.ray.block_batch import pack_blocks, unpack_block
from kvstore.ray.index_actor import RayBlockIndex, StoredBatch, object_key
from kvstore.ray.object_index import Located, ObjectKey
from kvstore.ray.ref_cache import RefCache
from kvstore.spec import BlockSpec
from kvstore.stats import StatsRecorder, StoreStats
from kvstore.store import KVStore, StoreUnavailableError

DEFAULT_NAMESPACE = "kvrelay"
DEFAULT_BUDGET_BYTES = 4 << 30
DEFAULT_REF_CACHE_BYTES = 512 << 20
DEFAULT_TAIL_TTL_S = 60.0
DEFAULT_TIMEOUT_S = 10.0
# Objects of at most 64 MiB: big enough that Ray's cost per object (~0.5 ms) is a
# few percent of copying it, small enough that eviction and a cross-node read of
# one prefix do not move a whole long prompt.
MAX_OBJECT_BYTES = 64 << 20
# In the index actor's name: a detached actor outlives upgrades, and a store must
# never call one whose methods take other arguments (2: batch objects, touches).
INDEX_PROTOCOL = 2


class RayStore(KVStore):
    """Blocks in the Ray object store of the cluster this process is connected to.

    Connects with `ray.init()` (honouring `RAY_ADDRESS`) if Ray is not initialized
    yet. The index actor is named `kvrelay-kvindex-v<INDEX_PROTOCOL>-<fingerprint
    hex>` in Ray namespace `namespace`, created by the first store that asks for it
    (`num_cpus=0`, so it never takes a worker's CPU). It is detached by default:
    a non-detached actor dies with the handles of the process that created it,
    which would wipe the index shared by every worker when one of them stops.
    `budget_bytes` is the index's byte budget, fixed by whoever creates the actor;
    `ref_cache_bytes` bounds the objects this store object keeps alive itself
    (0: none). `lookup` always asks the index, since it answers for every
    worker; `get` asks it only for blocks the ref cache lacks. `tail_ttl_s`
    applies to the tails this store object writes. Every
    Ray call is bounded by `timeout_s`; a timeout, a dead actor or a full object
    store raises `StoreUnavailableError`, and the next call looks the actor up
    again (a restarted index starts empty). Thread-safe.
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
        secret: bytes | None = None,
    ) -> None:
        super().__init__(spec)
        self._ref_cache: RefCache[ray.ObjectRef] = RefCache(ref_cache_bytes)
        if not ray.is_initialized():
            ray.init()
        self.namespace = namespace
        self.timeout_s = timeout_s
        self.tail_ttl_s = tail_ttl_s
        self._actor_name = f"kvrelay-kvindex-v{INDEX_PROTOCOL}-{spec.fingerprint.hex()}"
        self._actor_options = {
            "name": self._actor_name,
            "namespace": namespace,
            "get_if_exists": True,
            "num_cpus": 0,
            "lifetime": "detached" if is_detached else None,
            # A dead index actor is restarted by Ray (with an empty index: the blocks
            # it named are lost, which readers see as misses), not recreated by the
            # next caller, so every store object keeps the same handle.
            "max_restarts": -1,
        }
        self._actor_args = (budget_bytes, DEFAULT_TAIL_TTL_S)
        self._num_blocks_per_object = max(1, min(MAX_OBJECT_BYTES, budget_bytes) // spec.nbytes)
        self._codec = BlockCodec(spec, secret)
        self._stats = StatsRecorder()
        self._lock = threading.Lock()
        self._actor: ray.actor.ActorHandle | None = None

    def lookup(self, hashes: Sequence[BlockHash]) -> int:
        if not hashes:
            return 0
        return self._call_reporting_reads("lookup", list(hashes))

    def put(self, blocks: Sequence[tuple[BlockHash, torch.Tensor]]) -> None:
        for _, kv in blocks:
            self.spec.check_payload(kv)
        batches = []
        for start in range(0, len(blocks), self._num_blocks_per_object):
            part = blocks[start : start + self._num_blocks_per_object]
            ref = self._put_object(pack_blocks(self._codec, part))
            batches.append(StoredBatch([h for h, _ in part], ref, len(part) * self.spec.nbytes))
        if not batches:
            return
        # Synchronous, so that a put is visible to every reader when it returns.
        self._call_reporting_reads("put", batches)
        for batch in batches:
            positions = [(block_hash, i) for i, block_hash in enumerate(batch.hashes)]
            self._ref_cache.add_put(object_key(batch.ref), batch.ref, positions, batch.num_bytes)
        self._stats.add(bytes_in=len(blocks) * self.spec.nbytes)

    def _get_blocks(
        self, hashes: Sequence[BlockHash], out: list[torch.Tensor | None]
    ) -> list[torch.Tensor | None]:
        if not hashes:
            return []
        found = self._locate(hashes)
        refs = {entry.key: entry.handle for entry in found if entry is not None}
        stored = dict(zip(refs, self._fetch(list(refs.values())), strict=True))
        blocks: list[torch.Tensor | None] = []
        bad = {key for key, batch in stored.items() if batch is None}  # lost
        for block_hash, entry, dest in zip(hashes, found, out, strict=True):
            batch = None if entry is None else stored[entry.key]
            kv = None if batch is None else self._decode(batch, entry.position, block_hash, dest)
            if batch is None:
                self._stats.add(misses=1)
            elif kv is None:
                bad.add(entry.key)  # corrupt: dropped, so that the next put replaces it
            blocks.append(kv)
        if bad:
            self._forget(list(bad))
        return blocks

    def put_tail(self, request_id: str, kv: torch.Tensor, prompt_hash: BlockHash) -> None:
        self.spec.check_payload(kv, is_tail=True)
        key = tail_key(request_id, prompt_hash)
        ref = self._put_object(pack_blocks(self._codec, [(key, kv)]))
        self._call("put_tail", request_id, [ref], self.tail_ttl_s)
        self._stats.add(bytes_in=kv.nbytes)

    def get_tail(self, request_id: str, prompt_hash: BlockHash) -> torch.Tensor | None:
        boxed_ref = self._call("get_tail", request_id)
        stored = None if boxed_ref is None else self._fetch(boxed_ref)[0]
        if stored is None:
            self._stats.add(misses=1)
            return None
        return self._decode(stored, 0, tail_key(request_id, prompt_hash), None, is_tail=True)

    def delete_tail(self, request_id: str) -> None:
        self._call("delete_tail", request_id)

    def num_tails(self) -> int:
        return self._call("num_tails")

    def num_blocks(self) -> int:
        """Blocks in the index now (tests use it to check eviction)."""
        return self._call("num_blocks")

    @property
    def num_cached_blocks(self) -> int:
        """Blocks this store object can read without asking the index."""
        return len(self._ref_cache)

    def stats(self) -> StoreStats:
        return self._stats.snapshot()

    @property
    def is_authenticated(self) -> bool:
        return self._codec.is_authenticated

    def is_healthy(self) -> bool:
        try:
            return ray.is_initialized() and bool(self._call("ping"))
        except StoreUnavailableError:
            return False

    def clear_index(self) -> None:
        """Drops every block and tail of this fingerprint from the shared index,
        and this store object's ref cache (other stores keep theirs)."""
        self._call("clear")
        self._ref_cache.clear()

    def close(self) -> None:
        # The index actor is shared with other stores; only our handle and refs go.
        self._ref_cache.clear()
        with self._lock:
            self._actor = None

    def _locate(self, hashes: Sequence[BlockHash]) -> list[Located[ray.ObjectRef] | None]:
        """Where each block is: from the ref cache, then one index call for the rest."""
        found = self._ref_cache.locate(hashes)
        missing = [i for i, entry in enumerate(found) if entry is None]
        if not missing:
            return found
        objects, locations = self._call_reporting_reads("locate", [hashes[i] for i in missing])
        keys = [object_key(ref) for ref, _ in objects]
        blocks_of: dict[ObjectKey, list[tuple[BlockHash, int]]] = {key: [] for key in keys}
        for i, location in zip(missing, locations, strict=True):
            if location is not None:
                slot, position = location
                ref, object_bytes = objects[slot]
                found[i] = Located(keys[slot], ref, position, object_bytes)
                blocks_of[keys[slot]].append((hashes[i], position))
        for key, (ref, object_bytes) in zip(keys, objects, strict=True):
            self._ref_cache.add(key, ref, blocks_of[key], object_bytes)
        return found

    def _forget(self, keys: list[ObjectKey]) -> None:
        """Drops lost or corrupt objects here and, best effort, in the index (if
        it cannot be reached, the next reader tells it)."""
        self._ref_cache.forget(keys)
        with contextlib.suppress(StoreUnavailableError):
            self._call("forget", keys)

    def _put_object(self, stored: list[object]) -> ray.ObjectRef:
        try:
            return ray.put(stored)
        except RayError as exc:  # ObjectStoreFullError, a lost connection, ...
            raise self._unavailable("Ray object store refused the put", exc) from exc

    def _fetch(self, refs: list[ray.ObjectRef]) -> list[object | None]:
        """The objects behind `refs`; `None` for one that is lost (its owner died)."""
        try:
            return self._ray_get(refs)
        except ObjectLostError:
            pass  # some object is lost: fetch one by one to tell which
        objects: list[object | None] = []
        for ref in refs:
            try:
                objects.append(self._ray_get(ref))
            except ObjectLostError:
                objects.append(None)
        return objects

    def _ray_get(self, refs: ray.ObjectRef | list[ray.ObjectRef]) -> object:
        """`ray.get` within `timeout_s`. Only a lost object raises `ObjectLostError`
        (a miss); anything else (a timeout, a fetch from another node timing out, a
        dead raylet) is this reader's trouble, not the object's: the index keeps
        the object and the caller gets StoreUnavailableError."""
        try:
            return ray.get(refs, timeout=self.timeout_s)
        except ObjectFetchTimedOutError as exc:  # an ObjectLostError, but nothing is lost
            raise self._unavailable("Ray object fetch timed out", exc) from exc
        except ObjectLostError:
            raise
        except RayError as exc:
            raise self._unavailable("Ray object store failed", exc) from exc

    def _unavailable(self, what: str, exc: Exception) -> StoreUnavailableError:
        self._stats.add(errors=1)
        return StoreUnavailableError(f"{what}: {exc}")

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
        `None`, counted as a corrupt miss, if it is not the block `key` names."""
        try:
            header, payload = unpack_block(stored, position)
            kv = self._codec.decode_parts(header, payload, key, is_tail=is_tail, out=out)
        except BlockCodecError:
            self._stats.add(misses=1, corrupt_blocks=1)
            return None
        self._stats.add(hits=1, bytes_out=kv.nbytes)
        return kv

    def _call(self, method: str, *args: object) -> object:
        """Calls the index actor and waits at most `timeout_s`; any Ray failure
        (a timeout, a dead or failing actor, a lost connection) is
        StoreUnavailableError, and the actor is looked up again next time."""
        try:
            actor = self._index()
            return ray.get(getattr(actor, method).remote(*args), timeout=self.timeout_s)
        except RayError as exc:
            with self._lock:
                self._actor = None  # look it up (or recreate it) next time
            raise self._unavailable("Ray KV index unavailable", exc) from exc

    def _call_reporting_reads(self, method: str, *args: object) -> object:
        """`_call` with the blocks read through the ref cache since the last call
        (`touched`); they are kept for the next call if this one fails."""
        touched = self._ref_cache.take_touched()
        try:
            return self._call(method, *args, touched)
        except StoreUnavailableError:
            self._ref_cache.give_back_touched(touched)
            raise

    def _index(self) -> ray.actor.ActorHandle:
        with self._lock:
            if self._actor is None:
                self._actor = (
                    ray.remote(RayBlockIndex)
                    .options(**self._actor_options)
                    .remote(*self._actor_args)
                )
            return self._actor
