"""KV-store throughput: put-then-get of real KV blocks, next to the raw baseline.

    python -m benchmarks.kvstore --backend redis --url redis://127.0.0.1:6379 --mib 256
    python -m benchmarks.kvstore --backend all --mib 256   # starts its own redis-server and Ray

Blocks have the `dummy:135m` shape (30 layers, 3 KV heads, head_dim 64, block 16,
float32: 720 KiB each). Each side does, per batch of `--batch` blocks:

- ours put: `KVStore.put` (codec header, xxh3 checksum; Redis: one pipeline of
  SET EX sent with no copy; Ray: one `ray.put` of the whole batch as one object,
  one index-actor call; new hashes every round).
- ours get: `KVStore.get_into` preallocated tensors (Redis: one GETEX pipeline
  received past hiredis; Ray: the refs from the store's ref cache, which its own
  put filled, and one `ray.get`), every header and checksum verified before the
  block is copied into its tensor.
- ours cold get (Ray): a Ray actor (another process) with no refs of its own
  reads blocks this process put: one index-actor call per batch turns the hashes
  into refs, as for a decode worker reading what a prefill worker wrote.
- raw redis: redis-py pipelined SET EX / GET of `bytes` (hiredis), nothing checked,
  values left as `bytes`.
- raw ray: `ray.put` of uint8 arrays, `ray.get` of the refs (already in hand):
  read-only views of shared memory, not a byte moved. "raw+copy" also copies each
  array into preallocated memory, the least a KV consumer must do (it needs the
  block in its own pool, writable): the Ray goal is measured against raw+copy.
  "list+copy" puts each batch's arrays as one list, one object, as ours does.

Both sides run against the same server, the raw ones in this process; runs are
interleaved and each GB/s is the best of `--repeats` (the machine is shared, so
the best run is the least disturbed one), after `--warmups` untimed rounds; the
"ratio" divides the two sides' best runs, the "paired" ratio is the median over
rounds of the ratio within a round (the steadier of the two). For
Ray, a last line splits a batch's time into what ours adds: the index round trip
and the checksum.
"""

from __future__ import annotations

import argparse
import ctypes
import itertools
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import xxhash

from kvstore.factory import open_store
from kvstore.hashing import hash_token_blocks
from kvstore.spec import BlockSpec
from kvstore.store import KVStore

if TYPE_CHECKING:
    from kvstore.ray_store import RayStore

SPEC_135M = BlockSpec("dummy:135m", num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)


@dataclass(frozen=True)
class Throughput:
    """One client's timed rounds over the same data."""

    num_bytes: int
    """Bytes each put-all and get-all moves."""
    put_s: tuple[float, ...]
    """Seconds of each timed round's put-all."""
    get_s: tuple[float, ...]
    """Seconds of each timed round's get-all."""

    @property
    def put_gbps(self) -> float:
        """The best round's put throughput (the least disturbed one)."""
        return self.num_bytes / min(self.put_s) / 1e9

    @property
    def get_gbps(self) -> float:
        return self.num_bytes / min(self.get_s) / 1e9

    def paired_ratios(self, raw: Throughput) -> tuple[float, float]:
        """Median over rounds of this client's put and get speed over `raw`'s in
        the same round: both sides saw the same background load, so the median
        is the steadier comparison on a shared machine."""
        return (
            statistics.median(r / o for o, r in zip(self.put_s, raw.put_s, strict=True)),
            statistics.median(r / o for o, r in zip(self.get_s, raw.get_s, strict=True)),
        )


@dataclass(frozen=True)
class Workload:
    """One client's put-all and get-all over `num_bytes` of blocks."""

    put_all: Callable[[], None]
    get_all: Callable[[], None]
    num_bytes: int
    check: Callable[[], None] | None = None
    """Verifies what the last `get_all` read (run once, after the timed runs)."""


def pin_malloc_thresholds() -> bool:
    """Fixes glibc's mmap and trim thresholds for the run; returns whether it could.

    By default glibc serves a 720 KiB allocation with a fresh `mmap` until it
    has seen one freed, and gives memory back to the kernel whenever the top of
    the heap is free, so a client that allocates a `bytes` per value (redis-py's
    raw GET) keeps faulting in new pages: raw Redis reads ran at ~1 GB/s or
    ~3 GB/s depending only on what the process had allocated before. Pinning the
    thresholds takes the allocator out of the comparison (it can only speed the
    raw clients up; ours receives into memory it already has).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(libc.mallopt(m_mmap_threshold, 256 << 20)) and bool(
        libc.mallopt(m_trim_threshold, 1 << 30)
    )


def measure(
    workloads: list[Workload], num_repeats: int, num_warmups: int, settle_s: float = 0.5
) -> list[Throughput]:
    """`num_repeats` timed rounds of each workload, runs interleaved, after
    `num_warmups` untimed rounds.

    Interleaving (every put, then every get, round after round) exposes every
    client to the same background load, which matters on a shared machine; the
    order rotates each round, and the gets start `settle_s` after the last put,
    because a server that has just taken a burst of writes serves the first
    reader after it slower (measured for Redis: whichever get came first ran at
    ~0.6-0.8 of the other, ours or raw). The warm-up rounds take the first touch
    of memory out of the numbers: a server's or object store's fresh pages and
    the destination tensors fault in at a fraction of copy speed (~0.4 GB/s
    here, whatever the client).
    """
    put_s: list[list[float]] = [[] for _ in workloads]
    get_s: list[list[float]] = [[] for _ in workloads]
    for round_index in range(num_warmups + num_repeats):
        order = [(round_index + i) % len(workloads) for i in range(len(workloads))]
        round_put_s = {i: _timed(workloads[i].put_all) for i in order}
        time.sleep(settle_s)
        round_get_s = {i: _timed(workloads[i].get_all) for i in order}
        if round_index >= num_warmups:
            for i in range(len(workloads)):
                put_s[i].append(round_put_s[i])
                get_s[i].append(round_get_s[i])
    for workload in workloads:
        if workload.check is not None:
            workload.check()
    return [
        Throughput(w.num_bytes, tuple(p), tuple(g))
        for w, p, g in zip(workloads, put_s, get_s, strict=True)
    ]


def _timed(run: Callable[[], None]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def batches(num_items: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, num_items, batch_size):
        yield slice(start, min(start + batch_size, num_items))


def store_workload(
    store: KVStore, num_blocks: int, batch_size: int, is_fresh_each_round: bool = False
) -> Workload:
    """`store` puts the blocks, then gets them back into preallocated tensors.

    With `is_fresh_each_round`, every round puts them under new hashes (other
    token ids): the Ray store's put is idempotent (the index keeps a block's first
    copy and drops the rest), so re-putting would time puts that store nothing.
    Redis's SET overwrites, so the same keys cost the same and keep the server's
    memory bounded.
    """
    spec = store.spec
    blocks = [torch.randn(spec.shape, dtype=spec.dtype) for _ in range(num_blocks)]
    out = [torch.empty(spec.shape, dtype=spec.dtype) for _ in range(num_blocks)]
    hashes = round_hashes(spec, num_blocks, 0)
    rounds = itertools.count()

    def put_all() -> None:
        if is_fresh_each_round:
            hashes[:] = round_hashes(spec, num_blocks, next(rounds))
        for part in batches(num_blocks, batch_size):
            store.put(list(zip(hashes[part], blocks[part], strict=True)))

    def get_all() -> None:
        for part in batches(num_blocks, batch_size):
            found = store.get_into(hashes[part], out[part])
            assert all(found), "a block was missing: is the server's memory large enough?"

    def check() -> None:
        assert all(torch.equal(a, b) for a, b in zip(blocks, out, strict=True)), "wrong bytes"

    return Workload(put_all, get_all, num_blocks * spec.nbytes, check)


def round_hashes(spec: BlockSpec, num_blocks: int, round_index: int) -> list[bytes]:
    """The block hashes of a prompt of `num_blocks` blocks that no other round uses."""
    first = round_index * num_blocks * spec.block_size
    tokens = list(range(first, first + num_blocks * spec.block_size))
    return hash_token_blocks(tokens, spec.block_size, spec.fingerprint)


class ColdReader:
    """A Ray actor (another process) that reads blocks it holds no refs for: every
    get asks the index actor for them, as a decode worker does for blocks a
    prefill worker wrote."""

    def __init__(self, spec: BlockSpec, namespace: str, num_blocks: int) -> None:
        from kvstore.ray_store import RayStore

        self.store = RayStore(spec, namespace=namespace, ref_cache_bytes=0)
        self.out = [torch.empty(spec.shape, dtype=spec.dtype) for _ in range(num_blocks)]

    def get_all(self, hashes: list[bytes], batch_size: int) -> int:
        """Reads every block into its own tensor; returns how many were found."""
        num_found = 0
        for part in batches(len(hashes), batch_size):
            num_found += sum(self.store.get_into(hashes[part], self.out[part]))
        return num_found


def ray_cold_workload(
    writer: RayStore, namespace: str, num_blocks: int, batch_size: int
) -> Workload:
    """`writer` (here) puts fresh blocks each round; a `ColdReader` gets them. The
    time of a get includes one call to the reader actor (~1 ms in ~60)."""
    import ray

    spec = writer.spec
    reader = ray.remote(ColdReader).options(num_cpus=0).remote(spec, namespace, num_blocks)
    blocks = [torch.randn(spec.shape, dtype=spec.dtype) for _ in range(num_blocks)]
    hashes: list[bytes] = []
    rounds = itertools.count(10**4)  # other hashes than every store_workload's

    def put_all() -> None:
        hashes[:] = round_hashes(spec, num_blocks, next(rounds))
        for part in batches(num_blocks, batch_size):
            writer.put(list(zip(hashes[part], blocks[part], strict=True)))

    def get_all() -> None:
        num_found = ray.get(reader.get_all.remote(hashes, batch_size))
        assert num_found == num_blocks, f"the cold reader found {num_found} of {num_blocks}"

    return Workload(put_all, get_all, num_blocks * spec.nbytes)


def raw_redis_workload(url: str, num_blocks: int, nbytes: int, batch_size: int) -> Workload:
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


@contextmanager
def own_redis_server() -> Iterator[str]:
    """A throwaway `redis-server` on a free port (no persistence), stopped on exit."""
    if shutil.which("redis-server") is None:
        raise SystemExit("no --url given and no redis-server binary to start")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as workdir:
        process = subprocess.Popen(
            [
                *("redis-server", "--port", str(port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", workdir),
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            for _ in range(200):
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
                    break
                except OSError:
                    time.sleep(0.025)
            yield f"redis://127.0.0.1:{port}"
        finally:
            process.kill()
            process.wait()


def report(name: str, ours: Throughput, raw: Throughput | None, raw_name: str = "raw") -> None:
    if raw is None:
        print(f"{name:8s} ours put {ours.put_gbps:6.2f} GB/s  get {ours.get_gbps:6.2f} GB/s")
        return
    paired_put, paired_get = ours.paired_ratios(raw)
    print(
        f"{name:8s} ours put {ours.put_gbps:6.2f} GB/s  get {ours.get_gbps:6.2f} GB/s | "
        f"{raw_name} put {raw.put_gbps:6.2f} GB/s  get {raw.get_gbps:6.2f} GB/s | "
        f"ratio put {ours.put_gbps / raw.put_gbps:4.2f}  get {ours.get_gbps / raw.get_gbps:4.2f}"
        f" | paired put {paired_put:4.2f}  get {paired_get:4.2f}"
    )


def report_overheads(
    store: RayStore,
    ours: Throughput,
    cold: Throughput,
    raw: Throughput,
    num_blocks: int,
    batch_size: int,
) -> None:
    """Per-batch milliseconds of each side, and of what ours adds to `raw+copy`:
    the index actor's round trip bare (`lookup`, no refs in the reply) and as a
    cold get makes it (`locate`: the batch's one `ObjectRef` in the reply), which
    a get served by the ref cache skips, and the xxh3 checksum every read
    verifies. Best of 5 passes over all batches of blocks put for the purpose."""
    spec = store.spec
    hashes = round_hashes(spec, num_blocks, 2 * 10**4)
    parts = list(batches(num_blocks, batch_size))
    block = torch.randn(spec.shape, dtype=spec.dtype)
    for part in parts:
        store.put([(block_hash, block) for block_hash in hashes[part]])
    payloads = [np.random.bytes(spec.nbytes) for _ in range(batch_size)]

    def per_batch_ms(run: Callable[[slice], object]) -> float:
        best_s = min(_timed(lambda: [run(part) for part in parts]) for _ in range(5))
        return best_s / len(parts) * 1e3

    lookup_ms = per_batch_ms(lambda part: store._call("lookup", hashes[part]))
    # Diagnostic only: the index call a cold `RayStore.get` makes, without the ray.get after it.
    index_get_ms = per_batch_ms(lambda part: store._call("locate", hashes[part]))
    checksum_ms = per_batch_ms(lambda _: [xxhash.xxh3_64_intdigest(p) for p in payloads])
    batch_bytes = batch_size * spec.nbytes
    print(
        f"per batch of {batch_size}: get ours {batch_bytes / ours.get_gbps / 1e6:.2f} ms, "
        f"cold {batch_bytes / cold.get_gbps / 1e6:.2f} ms, "
        f"raw+copy {batch_bytes / raw.get_gbps / 1e6:.2f} ms | "
        f"put ours {batch_bytes / ours.put_gbps / 1e6:.2f} ms, "
        f"raw {batch_bytes / raw.put_gbps / 1e6:.2f} ms | index round trip: bare "
        f"{lookup_ms:.2f} ms, with refs {index_get_ms:.2f} ms | xxh3 {checksum_ms:.2f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["memory", "redis", "ray", "all"], default="all")
    parser.add_argument("--url", help="Redis URL; default: start a redis-server for the run")
    parser.add_argument("--mib", type=int, default=256, help="MiB moved each way (default 256)")
    parser.add_argument("--batch", type=int, default=16, help="blocks per call (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="runs per number (best kept)")
    parser.add_argument("--warmups", type=int, default=2, help="untimed rounds first (default 2)")
    args = parser.parse_args()

    spec = SPEC_135M
    num_blocks = max(1, args.mib * 2**20 // spec.nbytes)
    if not pin_malloc_thresholds():
        print(
            "note: glibc's malloc thresholds could not be pinned; raw Redis may read slower",
            file=sys.stderr,
        )
    print(
        f"{num_blocks} blocks of {spec.nbytes / 2**10:.0f} KiB ({num_blocks * spec.nbytes / 2**20:.0f} MiB)"
        f" each way, batch {args.batch}, best of {args.repeats} after {args.warmups} warm-ups"
    )
    backends = ["memory", "redis", "ray"] if args.backend == "all" else [args.backend]
    for backend in backends:
        if backend == "memory":
            store = open_store("memory", spec, budget_bytes=2 * num_blocks * spec.nbytes)
            (ours,) = measure(
                [store_workload(store, num_blocks, args.batch)], args.repeats, args.warmups
            )
            report("memory", ours, None)
        elif backend == "redis":
            with own_redis_server() if args.url is None else _given(args.url) as url:
                store = open_store(url, spec, timeout_s=30)
                ours, raw = measure(
                    [
                        store_workload(store, num_blocks, args.batch),
                        raw_redis_workload(url, num_blocks, spec.nbytes, args.batch),
                    ],
                    args.repeats,
                    args.warmups,
                )
                store.close()
                report("redis", ours, raw)
        else:
            import ray

            from kvstore.ray_store import RayStore

            # A fixed object store whose pages are all touched up front, as on a node
            # that has served for a while: otherwise whichever put first lands on
            # fresh shared memory pays the page faults (~0.4 GB/s), whoever it is.
            round_bytes = num_blocks * spec.nbytes
            ray.init(
                address="local",
                num_cpus=2,
                include_dashboard=False,
                logging_level="ERROR",
                object_store_memory=max(1 << 30, 16 * round_bytes),
                _system_config={"preallocate_plasma_memory": True},
            )
            # Room for two rounds of both writers in the index, and of ours in its
            # ref cache: every get finds its blocks, old rounds are evicted.
            store = RayStore(
                spec,
                namespace="kvbench",
                budget_bytes=4 * round_bytes,
                ref_cache_bytes=2 * round_bytes,
            )
            cold_writer = RayStore(spec, namespace="kvbench", ref_cache_bytes=0)
            ours, cold, raw, raw_copied, listed_copied = measure(
                [
                    store_workload(store, num_blocks, args.batch, is_fresh_each_round=True),
                    ray_cold_workload(cold_writer, "kvbench", num_blocks, args.batch),
                    raw_ray_workload(num_blocks, spec.nbytes, args.batch, is_copied=False),
                    raw_ray_workload(num_blocks, spec.nbytes, args.batch, is_copied=True),
                    raw_ray_workload(
                        num_blocks, spec.nbytes, args.batch, is_copied=True, is_listed=True
                    ),
                ],
                args.repeats,
                args.warmups,
            )
            report("ray", ours, raw)
            report("ray", ours, raw_copied, raw_name="raw+copy")
            report("ray", ours, listed_copied, raw_name="list+copy")
            report("ray cold", cold, raw_copied, raw_name="raw+copy")
            report_overheads(store, ours, cold, raw_copied, num_blocks, args.batch)
            ray.shutdown()


@contextmanager
def _given(url: str) -> Iterator[str]:
    yield url


if __name__ == "__main__":
    main()
