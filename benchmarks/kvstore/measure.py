"""Timed rounds of several clients over the same data, and their throughput."""

from __future__ import annotations

import ctypes
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Workload:
    """One client's put-all and get-all over `num_bytes` of blocks."""

    put_all: Callable[[], None]
    get_all: Callable[[], None]
    num_bytes: int
    check: Callable[[], None] | None = None
    """Verifies what the last `get_all` read (run once, after the timed runs)."""


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

    def paired_ratios(self, raw: Throughput) -> tuple[list[float], list[float]]:
        """This client's put and get speed over `raw`'s, round by round: both
        sides of a round saw the same background load, so their median is the
        steadier comparison on a shared machine than the best runs' ratio."""
        return (
            [r / o for o, r in zip(self.put_s, raw.put_s, strict=True)],
            [r / o for o, r in zip(self.get_s, raw.get_s, strict=True)],
        )


def measure(
    workloads: list[Workload], num_repeats: int, num_warmups: int, settle_s: float = 0.5
) -> list[Throughput]:
    """`num_repeats` timed rounds of each workload, after `num_warmups` untimed ones.

    - Every round runs every put, then every get, so that all clients see the
      same background load, which matters on a shared machine.
    - The order rotates with the timed round, so that over a multiple of
      `len(workloads)` rounds every client runs in every position equally often.
    - The gets start `settle_s` after the last put: a server that has just taken
      a burst of writes serves the first reader after it slower (for Redis,
      whichever get came first ran at ~0.6-0.8 of the other, ours or raw).
    - The warm-up rounds take the first touch of memory out of the numbers: a
      server's or object store's fresh pages and the destination tensors fault
      in at a fraction of copy speed (~0.4 GB/s here, whatever the client).
    """
    put_s: list[list[float]] = [[] for _ in workloads]
    get_s: list[list[float]] = [[] for _ in workloads]
    for round_index in range(-num_warmups, num_repeats):
        order = [(round_index + i) % len(workloads) for i in range(len(workloads))]
        round_put_s = {i: timed(workloads[i].put_all) for i in order}
        time.sleep(settle_s)
        round_get_s = {i: timed(workloads[i].get_all) for i in order}
        if round_index >= 0:
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


def timed(run: Callable[[], object]) -> float:
    """Seconds `run()` takes."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def batches(num_items: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, num_items, batch_size):
        yield slice(start, min(start + batch_size, num_items))


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
