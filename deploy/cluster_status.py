"""A cluster's state as the router and its workers report it, and how it prints.

`fetch_cluster_status` asks the router for its workers (`Registry.ListWorkers`) and
each worker for its counters (`GetStats`); a worker that does not answer is listed
with its error instead of stats, so one dead worker does not hide the others.
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from deploy.remote_generate import RouterUnreachable
from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc
from rpc.channel import open_blocking_channel
from rpc.tls import ClusterTLS

_ROLE_NAMES = {wpb.WORKER_ROLE_PREFILL: "prefill", wpb.WORKER_ROLE_DECODE: "decode"}


@dataclass(frozen=True)
class WorkerStatus:
    """One registered worker: the router's view, and its own counters."""

    worker_id: str
    role: str
    """"prefill" or "decode"."""
    address: str
    num_waiting: int
    """Requests waiting for admission (the worker's own count when it answered)."""
    num_running: int
    """Requests being served."""
    kv_usage: float
    """Fraction of the KV pool in use (decode workers), from the last heartbeat."""
    stats: wpb.WorkerStats | None
    """Its `GetStats` answer; None when it did not answer."""
    error: str = ""
    """Why `stats` is None."""


@dataclass(frozen=True)
class ClusterStatus:
    target: str
    """The router asked."""
    model: str
    """The model the router serves."""
    kv_cache_dtype: str
    """How the cluster stores K/V ("" before a worker registered)."""
    workers: tuple[WorkerStatus, ...]
    """Sorted by worker id."""


def fetch_cluster_status(
    target: str, timeout_s: float = 3.0, tls: ClusterTLS | None = None
) -> ClusterStatus:
    """Asks the router's Registry at `target` (its internal address) and every
    worker it lists, over cluster mTLS when `tls` is given. Raises
    `RouterUnreachable` when the router does not answer."""
    with open_blocking_channel(target, tls) as channel:
        try:
            listed = wgrpc.RegistryStub(channel).ListWorkers(
                wpb.ListWorkersRequest(), timeout=timeout_s
            )
        except grpc.RpcError as err:
            raise RouterUnreachable(
                f"no kvrelay router Registry answers at {target} ({err.code().name}); start "
                "one with `kvrelay up` (or `kvrelay serve router`), or pass --router HOST:PORT "
                "(its internal port) and, on a cluster with TLS, --tls-dir"
            ) from None
    workers = [_worker_status(info, timeout_s, tls) for info in listed.workers]
    return ClusterStatus(
        target,
        listed.model,
        listed.kv_cache_dtype,
        tuple(sorted(workers, key=lambda w: w.worker_id)),
    )


def _worker_status(info: wpb.WorkerInfo, timeout_s: float, tls: ClusterTLS | None) -> WorkerStatus:
    stats, error = None, ""
    with open_blocking_channel(info.address, tls) as channel:
        stub = (
            wgrpc.PrefillWorkerStub(channel)
            if info.role == wpb.WORKER_ROLE_PREFILL
            else wgrpc.DecodeWorkerStub(channel)
        )
        try:
            stats = stub.GetStats(wpb.StatsRequest(), timeout=timeout_s)
        except grpc.RpcError as err:
            error = f"{err.code().name}: {err.details()}"
    return WorkerStatus(
        worker_id=info.worker_id,
        role=_ROLE_NAMES.get(info.role, "unknown"),
        address=info.address,
        num_waiting=stats.num_waiting if stats else info.num_waiting,
        num_running=stats.num_running if stats else info.num_running,
        kv_usage=info.kv_usage,
        stats=stats,
        error=error,
    )


def status_to_json(status: ClusterStatus) -> dict:
    """A JSON-ready dict: {"target", "model", "workers": [{...}]}, counters as ints."""
    workers = []
    for w in status.workers:
        entry: dict = {
            "worker_id": w.worker_id,
            "role": w.role,
            "address": w.address,
            "num_waiting": w.num_waiting,
            "num_running": w.num_running,
            "kv_usage": round(w.kv_usage, 4),
        }
        if w.stats is None:
            entry["error"] = w.error
        else:
            s = w.stats
            entry |= {
                "kv_cache_dtype": s.kv_cache_dtype,
                "num_blocks": s.num_blocks,
                "num_used_blocks": s.num_used_blocks,
                "kv_pool_tokens": s.kv_pool_tokens,
                "kv_pool_bytes": s.kv_pool_bytes,
                "num_computed_tokens_total": s.num_computed_tokens_total,
                "num_cached_tokens_total": s.num_cached_tokens_total,
                "num_generated_tokens_total": s.num_generated_tokens_total,
                "num_finished_requests_total": s.num_finished_requests_total,
                "num_preemptions_total": s.num_preemptions_total,
                "num_live_tails": s.num_live_tails,
                "store": {
                    "hits": s.store.hits,
                    "misses": s.store.misses,
                    "corrupt_blocks": s.store.corrupt_blocks,
                    "errors": s.store.errors,
                    "bytes_in": s.store.bytes_in,
                    "bytes_out": s.store.bytes_out,
                },
            }
        workers.append(entry)
    return {
        "target": status.target,
        "model": status.model,
        "kv_cache_dtype": status.kv_cache_dtype,
        "workers": workers,
    }


_COLUMNS = (
    "WORKER",
    "ROLE",
    "ADDRESS",
    "WAIT/RUN",
    "KV POOL",
    "STORE HIT/MISS/BAD",
    "TOKENS C/R/G",
)


def format_status_table(status: ClusterStatus) -> str:
    """A fixed-width table, one row per worker; KV POOL is blocks used of all and the
    tokens the pool holds; TOKENS are prompt tokens computed, prompt tokens reused
    from cache, and tokens generated."""
    rows = [_COLUMNS]
    for w in status.workers:
        if w.stats is None:
            rows.append((w.worker_id, w.role, w.address, "-", "-", "-", f"unreachable: {w.error}"))
            continue
        s = w.stats
        pool = (
            f"{s.num_used_blocks}/{s.num_blocks} ({s.num_used_blocks / s.num_blocks:.0%}) "
            f"of {s.kv_pool_tokens:,} tokens in {s.kv_pool_bytes / 2**30:.2f} GiB"
            if s.num_blocks
            else "-"
        )
        rows.append(
            (
                w.worker_id,
                w.role,
                w.address,
                f"{w.num_waiting}/{w.num_running}",
                pool,
                f"{s.store.hits}/{s.store.misses}/{s.store.corrupt_blocks}",
                f"{s.num_computed_tokens_total}/{s.num_cached_tokens_total}/"
                f"{s.num_generated_tokens_total}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    lines = [
        f"router {status.target} serving {status.model}"
        + (f", KV cache {status.kv_cache_dtype}" if status.kv_cache_dtype else "")
        + f": {len(status.workers)} workers",
        *(
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
            + "  "
            + row[-1]
            for row in rows
        ),
    ]
    return "\n".join(lines)
