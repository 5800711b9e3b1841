"""What each client does in a round: put every block, then get every block."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from benchmarks.kvstore.measure import Workload, batches
from kvstore.hashing import hash_token_blocks
from kvstore.spec import BlockSpec
from kvstore.store import KVStore

if TYPE_CHECKING:
    from kvstore.ray.store import RayStore

SPEC_135M = BlockSpec("dummy:135m", num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)


def prompt_hashes(spec: BlockSpec, num_blocks: int) -> list[bytes]:
    """The block hashes of one prompt of `num_blocks` full blocks."""
    return hash_token_blocks(
        list(range(num_blocks * spec.block_size)), spec.block_size, spec.fingerprint
    )


def store_workload(
    store: KVStore,
    num_blocks: int,
    batch_size: int,
    drop_previous: Callable[[], None] | None = None,
) -> Workload:
    """`store` puts the blocks, then gets them back into preallocated tensors.

    `drop_previous` runs first in every put-all, as the raw clients drop their
    last round's refs: the Ray store's put keeps a block's first copy, so
    without it a put would find every block present and store nothing.
    """
    spec = store.spec
    hashes = prompt_hashes(spec, num_blocks)
    blocks = [torch.randn(spec.shape, dtype=spec.dtype) for _ in range(num_blocks)]
    out = [torch.empty(spec.shape, dtype=spec.dtype) for _ in range(num_blocks)]

    def put_all() -> None:
        if drop_previous is not None:
            drop_previous()
        for part in batches(num_blocks, batch_size):
            store.put(list(zip(hashes[part], blocks[part], strict=True)))

    def get_all() -> None:
        for part in batches(num_blocks, batch_size):
            found = store.get_into(hashes[part], out[part])
            assert all(found), "a block was missing: is the server's memory large enough?"

    def check() -> None:
        assert all(torch.equal(a, b) for a, b in zip(blocks, out, strict=True)), "wrong bytes"

    return Workload(put_all, get_all, num_blocks * spec.nbytes, check)


class ColdReader:
    """A Ray actor (another process) that reads blocks it holds no refs for: every
    get asks the index actor for them, as a decode worker does for blocks a
    prefill worker wrote."""

    def __init__(self, spec: BlockSpec, namespace: str, num_blocks: int) -> None:
        from kvstore.ray.store import RayStore

        self.store = RayStore(spec, namespace=namespace, ref_cache_bytes=0)
        self.out = [torch.empty(spec.shape, dtype=spec.dtype) for _ in range(num_blocks)]

    def get_all(self, hashes: list[bytes], batch_size: int) -> int:
        """Reads every block into its own tensor; returns how many were found."""
        num_found = 0
        for part in batches(len(hashes), batch_size):
            num_found += sum(self.store.get_into(hashes[part], self.out[part]))
        return num_found


def ray_cold_workload(writer: RayStore, num_blocks: int, batch_size: int) -> Workload:
    """`writer` (here) puts the blocks; a `ColdReader` in `writer`'s namespace gets
    them. The time of a get includes one call to the reader actor (~1 ms in ~60)."""
    import ray

    spec = writer.spec
    reader = ray.remote(ColdReader).options(num_cpus=0).remote(spec, writer.namespace, num_blocks)
    hashes = prompt_hashes(spec, num_blocks)
    blocks = [torch.randn(spec.shape, dtype=spec.dtype) for _ in range(num_blocks)]

    def put_all() -> None:
        writer.clear_index()
        for part in batches(num_blocks, batch_size):
            writer.put(list(zip(hashes[part], blocks[part], strict=True)))

    def get_all() -> None:
        num_found = ray.get(reader.get_all.remote(hashes, batch_size))
        assert num_found == num_blocks, f"the cold reader found {num_found} of {num_blocks}"

    return Workload(put_all, get_all, num_blocks * spec.nbytes)


def raw_redis_workload(url: str, num_blocks: int, nbytes: int, batch_size: int) -> Workload:
    """redis-py pipelined SET EX and GET of `bytes` values (with hiredis)."""
    import redis

    client = redis.Redis.from_url(url)
    values = [np.random.bytes(nbytes) for _ in range(num_blocks)]
    keys = [f"kvbench:raw:{i}".encode() for i in range(num_blocks)]

    def put_all() -> None:
        for part in batches(num_blocks, batch_size):
            pipe = client.pipeline(transaction=False)
            for key, value in zip(keys[part], values[part], strict=True):
                pipe.set(key, value, ex=600)
            pipe.execute()

    def get_all() -> None:
        for part in batches(num_blocks, batch_size):
            pipe = client.pipeline(transaction=False)
            for key in keys[part]:
                pipe.get(key)
            assert all(v is not None for v in pipe.execute())

    return Workload(put_all, get_all, num_blocks * nbytes)


def raw_ray_workload(
    num_blocks: int, nbytes: int, batch_size: int, is_copied: bool, is_listed: bool = False
) -> Workload:
    """`ray.put`/`ray.get` of numpy arrays, one object per array; with
    `is_listed`, one object per batch (a list of its arrays). With `is_copied`,
    each array got is also copied into preallocated memory, as any consumer of KV
    blocks must do."""
    import ray

    arrays = [np.random.randint(0, 255, nbytes, dtype=np.uint8) for _ in range(num_blocks)]
    out = [np.empty(nbytes, dtype=np.uint8) for _ in range(num_blocks)]
    refs: list[ray.ObjectRef] = []

    def put_all() -> None:
        refs.clear()
        for part in batches(num_blocks, batch_size):
            if is_listed:
                refs.append(ray.put(arrays[part]))
            else:
                refs.extend(ray.put(array) for array in arrays[part])

    def get_all() -> None:
        for i, part in enumerate(batches(num_blocks, batch_size)):
            got = ray.get(refs[i]) if is_listed else ray.get(refs[part])
            if is_copied:
                for dest, array in zip(out[part], got, strict=True):
                    np.copyto(dest, array)

    return Workload(put_all, get_all, num_blocks * nbytes)
