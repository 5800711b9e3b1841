"""The lines a run prints: throughput and ratios per client, and what the Ray
store's get and put add per batch."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import xxhash

from benchmarks.kvstore.measure import Throughput, batches, timed
from benchmarks.kvstore.workloads import prompt_hashes

if TYPE_CHECKING:
    from kvstore.ray.store import RayStore


def report(name: str, ours: Throughput, raw: Throughput | None, raw_name: str = "raw") -> None:
    """Best-run GB/s of both sides, the ratio of the best runs, and the paired
    ratio: its median over rounds and its range."""
    line = f"{name:8s} ours put {ours.put_gbps:6.2f} GB/s  get {ours.get_gbps:6.2f} GB/s"
    if raw is None:
        print(line)
        return
    put_ratios, get_ratios = ours.paired_ratios(raw)
    print(
        f"{line} | {raw_name} put {raw.put_gbps:6.2f} GB/s  get {raw.get_gbps:6.2f} GB/s | "
        f"ratio put {ours.put_gbps / raw.put_gbps:4.2f}  get {ours.get_gbps / raw.get_gbps:4.2f}"
        f" | paired put {_spread(put_ratios)}  get {_spread(get_ratios)}"
    )


def _spread(ratios: list[float]) -> str:
    return f"{statistics.median(ratios):4.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"


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
    verifies. Best of 5 passes over the blocks of `store`'s last round."""
    spec = store.spec
    hashes = prompt_hashes(spec, num_blocks)
    parts = list(batches(num_blocks, batch_size))
    payloads = [np.random.bytes(spec.nbytes) for _ in range(batch_size)]

    def per_batch_ms(run: Callable[[slice], object]) -> float:
        best_s = min(timed(lambda: [run(part) for part in parts]) for _ in range(5))
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
