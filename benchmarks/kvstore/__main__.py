"""`python -m benchmarks.kvstore`: every backend against its raw client, in one run."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from benchmarks.kvstore import __doc__ as package_doc
from benchmarks.kvstore.measure import measure, pin_malloc_thresholds
from benchmarks.kvstore.report import report, report_overheads
from benchmarks.kvstore.servers import redis_server
from benchmarks.kvstore.workloads import (
    SPEC_135M,
    raw_ray_workload,
    raw_redis_workload,
    ray_cold_workload,
    store_workload,
)
from kvstore.factory import open_store


def main() -> None:
    parser = argparse.ArgumentParser(description=(package_doc or "").split("\n\n")[0])
    parser.add_argument("--backend", choices=["memory", "redis", "ray", "all"], default="all")
    parser.add_argument("--url", help="Redis URL; default: start a redis-server for the run")
    parser.add_argument("--mib", type=int, default=256, help="MiB moved each way (default 256)")
    parser.add_argument("--batch", type=int, default=16, help="blocks per call (default 16)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=10,
        help="timed rounds (default 10: a multiple of 2 and of 5 clients, so each "
        "client runs in each position equally often)",
    )
    parser.add_argument("--warmups", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument(
        "--with-secret",
        action="store_true",
        help="redis: also run our store with a KV secret (every block MAC'd, HMAC-SHA256) "
        "in the same rounds, and report it against the xxh3 store",
    )
    args = parser.parse_args()

    spec = SPEC_135M
    num_blocks = max(1, args.mib * 2**20 // spec.nbytes)
    round_bytes = num_blocks * spec.nbytes
    if not pin_malloc_thresholds():
        print(
            "note: glibc's malloc thresholds could not be pinned; raw Redis may read slower",
            file=sys.stderr,
        )
    print(
        f"{num_blocks} blocks of {spec.nbytes / 2**10:.0f} KiB ({round_bytes / 2**20:.0f} MiB)"
        f" each way, batch {args.batch}, {args.repeats} rounds after {args.warmups} warm-ups"
    )
    backends = ["memory", "redis", "ray"] if args.backend == "all" else [args.backend]
    for backend in backends:
        if backend == "memory":
            store = open_store("memory", spec, budget_bytes=2 * round_bytes)
            workload = store_workload(store, num_blocks, args.batch)
            (ours,) = measure([workload], args.repeats, args.warmups)
            report("memory", ours, None)
        elif backend == "redis":
            with redis_server(args.url) as url:
                store = open_store(url, spec, timeout_s=30)
                workloads = [
                    store_workload(store, num_blocks, args.batch),
                    raw_redis_workload(url, num_blocks, spec.nbytes, args.batch),
                ]
                if args.with_secret:
                    # Another fingerprint, so its blocks never share keys with the xxh3 store's.
                    mac_spec = dataclasses.replace(spec, model_id=spec.model_id + "-mac")
                    mac_store = open_store(url, mac_spec, timeout_s=30, secret=os.urandom(32))
                    workloads.append(store_workload(mac_store, num_blocks, args.batch))
                results = measure(workloads, args.repeats, args.warmups)
                store.close()
                report("redis", results[0], results[1])
                if args.with_secret:
                    mac_store.close()
                    report("redis+mac", results[2], results[1])
                    report("redis+mac", results[2], results[0], raw_name="ours/xxh3")
        else:
            run_ray(num_blocks, args.batch, args.repeats, args.warmups)


def run_ray(num_blocks: int, batch_size: int, num_repeats: int, num_warmups: int) -> None:
    import ray

    from kvstore.ray.store import RayStore

    spec = SPEC_135M
    round_bytes = num_blocks * spec.nbytes
    # A fixed object store whose pages are all touched up front, as on a node
    # that has served for a while: otherwise whichever put first lands on fresh
    # shared memory pays the page faults (~0.4 GB/s), whoever it is.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        logging_level="ERROR",
        object_store_memory=max(1 << 30, 8 * round_bytes),
        _system_config={"preallocate_plasma_memory": True},
    )
    # Each of our two writers has its own index (namespace), holding one round;
    # each creates it now, with this budget, before anything is timed.
    stores = [
        RayStore(spec, namespace=f"kvbench-{name}", budget_bytes=2 * round_bytes, **options)
        for name, options in (("ours", {"ref_cache_bytes": 2 * round_bytes}), ("cold", {}))
    ]
    for store in stores:
        assert store.is_healthy(), "the Ray KV index did not start"
        store.clear_index()
    ours_store, cold_writer = stores
    ours, cold, raw, raw_copied, listed_copied = measure(
        [
            store_workload(ours_store, num_blocks, batch_size, ours_store.clear_index),
            ray_cold_workload(cold_writer, num_blocks, batch_size),
            raw_ray_workload(num_blocks, spec.nbytes, batch_size, is_copied=False),
            raw_ray_workload(num_blocks, spec.nbytes, batch_size, is_copied=True),
            raw_ray_workload(num_blocks, spec.nbytes, batch_size, is_copied=True, is_listed=True),
        ],
        num_repeats,
        num_warmups,
    )
    report("ray", ours, raw)
    report("ray", ours, raw_copied, raw_name="raw+copy")
    report("ray", ours, listed_copied, raw_name="list+copy")
    report("ray cold", cold, raw_copied, raw_name="raw+copy")
    report_overheads(ours_store, ours, cold, raw_copied, num_blocks, batch_size)
    ray.shutdown()


if __name__ == "__main__":
    main()
