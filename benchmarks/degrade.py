"""`python -m benchmarks.degrade`: overload and a store outage, each next to its
baseline in the same invocation.

**Overload.** On a fresh cluster (a router, one prefill and one decode worker,
Redis) the capacity is measured first: completed requests per second with every
request sent at once. Then two runs of `--duration` seconds with Poisson arrivals:
at that capacity, and at `--overload` (10) times it. Reported for each: the shed
rate (RESOURCE_EXHAUSTED answers), the p99 latency of a RESOURCE_EXHAUSTED answer,
the goodput of the admitted requests at the SLO, and each process's peak RSS.

**Store outage.** On another fresh cluster, a run at half the capacity during which
redis-server is killed at `--outage-start` seconds and started again (empty, on
the same port) `--outage-length` seconds later. Reported: requests ok and failed,
and p50/p99 TTFT of the requests sent before, during and after the outage.

    python -m benchmarks.degrade
    python -m benchmarks.degrade --duration 30 --json degrade.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

from benchmarks.serving.arrivals import ArrivalProcess
from benchmarks.serving.driver import run_workload, warm_up
from benchmarks.serving.launcher import BenchCluster, ClusterLayout
from benchmarks.serving.metrics import LatencyStats, RequestLatencies, Slo, compute_metrics
from benchmarks.serving.workload import Workload, random_workload


class RssSampler(threading.Thread):
    """Samples every process of a cluster's resident memory; keeps the peaks (MiB)."""

    def __init__(self, cluster: BenchCluster, interval_s: float = 0.1) -> None:
        super().__init__(name="rss", daemon=True)
        self.cluster = cluster
        self.interval_s = interval_s
        self.peak_mib: dict[str, float] = {}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            for name, process in list(self.cluster.processes.items()):
                self.peak_mib[name] = max(self.peak_mib.get(name, 0.0), _rss_mib(process.pid))

    def finish(self) -> dict[str, float]:
        self.stop.set()
        self.join(5)
        return {name: round(mib, 1) for name, mib in sorted(self.peak_mib.items())}


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class LoadRun:
    name: str
    rate: float
    num_requests: int
    num_ok: int
    num_shed: int
    num_other_errors: int
    shed_rate: float
    shed_latency_ms: LatencyStats
    goodput: float | None
    """Admitted requests per second that met the SLO."""
    ttft_ms: LatencyStats
    itl_ms: LatencyStats
    peak_rss_mib: dict[str, float]
    load_avg: tuple[float, float]


def _layout(model: str, name: str, max_inflight: int) -> ClusterLayout:
    cores = tuple(sorted(os.sched_getaffinity(0)))
    return ClusterLayout(
        name=name,
        model=model,
        prefill_cores=(cores[0],),
        decode_cores=(cores[-1],),
        kv_cache_gb=0.5,
        extra_router_args=("--max-inflight", str(max_inflight)),
    )


def _run(
    cluster: BenchCluster, workload: Workload, rate: float, name: str, slo: Slo, seed: int
) -> LoadRun:
    load_before = os.getloadavg()[0]
    sampler = RssSampler(cluster)
    sampler.start()
    arrivals = ArrivalProcess(rate=rate, seed=seed)
    run = asyncio.run(run_workload(cluster.target, workload, arrivals, run_id=name))
    peaks = sampler.finish()
    shed = [r for r in run.records if r.error.startswith("RESOURCE_EXHAUSTED")]
    other = [r for r in run.records if r.error and r not in shed]
    metrics = compute_metrics(run.records, run.duration_s, slo)
    return LoadRun(
        name=name,
        rate=round(rate, 3),
        num_requests=len(run.records),
        num_ok=metrics.num_completed,
        num_shed=len(shed),
        num_other_errors=len(other),
        shed_rate=round(len(shed) / len(run.records), 3),
        shed_latency_ms=LatencyStats.of([(r.end_time - r.send_time) * 1e3 for r in shed]),
        goodput=metrics.goodput,
        ttft_ms=metrics.ttft_ms,
        itl_ms=metrics.itl_ms,
        peak_rss_mib=peaks,
        load_avg=(load_before, os.getloadavg()[0]),
    )


def _capacity(cluster: BenchCluster, args: argparse.Namespace) -> float:
    """Completed requests per second with every request sent at once."""
    workload = random_workload(args.capacity_prompts, args.input_len, args.output_len, 1000)
    run = asyncio.run(run_workload(cluster.target, workload, ArrivalProcess(), run_id="capacity"))
    done = [r for r in run.records if r.is_success]
    return len(done) / run.duration_s


@dataclass
class OutagePhase:
    name: str
    num_sent: int
    num_ok: int
    ttft_ms: LatencyStats


def _outage(args: argparse.Namespace, rate: float, slo: Slo) -> tuple[list[OutagePhase], int]:
    layout = _layout(args.model, "outage", args.max_inflight)
    workload = random_workload(
        max(1, round(rate * args.duration)), args.input_len, args.output_len, args.seed + 1
    )
    with BenchCluster(layout) as cluster:
        asyncio.run(warm_up(cluster.target))
        start = [0.0]

        def outage() -> None:
            time.sleep(args.outage_start)
            print(f"degrade: killing redis at {args.outage_start:g} s", file=sys.stderr)
            cluster.signal("redis", signal.SIGKILL)
            cluster.processes["redis"].wait(10)
            time.sleep(args.outage_length)
            print("degrade: redis back", file=sys.stderr)
            cluster.restart("redis")

        thread = threading.Thread(target=outage, daemon=True)
        start[0] = time.perf_counter()
        thread.start()
        arrivals = ArrivalProcess(rate=rate, seed=args.seed + 1)
        run = asyncio.run(run_workload(cluster.target, workload, arrivals, run_id="outage"))
        thread.join(args.outage_start + args.outage_length + 15)
    t0 = min(r.send_time for r in run.records)
    down, up = args.outage_start, args.outage_start + args.outage_length
    phases = []
    for name, low, high in (("before", 0, down), ("during", down, up), ("after", up, math.inf)):
        records = [r for r in run.records if low <= r.send_time - t0 < high]
        ok = [r for r in records if r.is_success]
        phases.append(
            OutagePhase(
                name,
                len(records),
                len(ok),
                LatencyStats.of([RequestLatencies.of(r).ttft_ms for r in ok]),
            )
        )
    return phases, sum(not r.is_success for r in run.records)


def _ms(stats: LatencyStats, q: str) -> str:
    value = getattr(stats, q)
    return "-" if value is None else f"{value:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.degrade",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="dummy:135m")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of arrivals per run")
    parser.add_argument("--overload", type=float, default=10.0, help="times the capacity")
    parser.add_argument("--max-inflight", type=int, default=32, help="router admission limit")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--capacity-prompts", type=int, default=32)
    parser.add_argument("--slo", default="ttft_ms=3000,tpot_ms=300")
    parser.add_argument("--outage-start", type=float, default=20.0)
    parser.add_argument("--outage-length", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH")
    args = parser.parse_args(argv)
    slo = Slo.parse(args.slo)

    with BenchCluster(_layout(args.model, "overload", args.max_inflight)) as cluster:
        asyncio.run(warm_up(cluster.target))
        capacity = _capacity(cluster, args)
        print(f"degrade: measured capacity {capacity:.2f} req/s", file=sys.stderr)
        runs = []
        for name, factor in (("at capacity", 1.0), (f"{args.overload:g}x capacity", args.overload)):
            rate = capacity * factor
            num = max(1, round(rate * args.duration))
            workload = random_workload(num, args.input_len, args.output_len, args.seed)
            runs.append(_run(cluster, workload, rate, name, slo, args.seed))
    phases, num_outage_failed = _outage(args, capacity / 2, slo)

    print(f"overload (capacity {capacity:.2f} req/s, router --max-inflight {args.max_inflight})")
    print(f"{'':<26}" + "".join(f"{r.name:>18}" for r in runs))
    rows = [
        ("rate (req/s)", [f"{r.rate:.2f}" for r in runs]),
        ("requests", [str(r.num_requests) for r in runs]),
        ("ok", [str(r.num_ok) for r in runs]),
        ("shed (RESOURCE_EXHAUSTED)", [f"{r.num_shed} ({r.shed_rate:.0%})" for r in runs]),
        ("other errors", [str(r.num_other_errors) for r in runs]),
        ("shed answer p99 (ms)", [_ms(r.shed_latency_ms, "p99") for r in runs]),
        ("goodput (req/s at SLO)", [f"{r.goodput:.2f}" for r in runs]),
        ("TTFT p99 of admitted (ms)", [_ms(r.ttft_ms, "p99") for r in runs]),
        ("load avg before/after", [f"{r.load_avg[0]:.1f}/{r.load_avg[1]:.1f}" for r in runs]),
    ]
    for name in runs[0].peak_rss_mib:
        rows.append(
            (f"peak RSS {name} (MiB)", [f"{r.peak_rss_mib.get(name, 0):.0f}" for r in runs])
        )
    for label, values in rows:
        print(f"{label:<26}" + "".join(f"{v:>18}" for v in values))
    print(
        f"\nstore outage (redis killed at {args.outage_start:g} s for {args.outage_length:g} s, "
        f"{capacity / 2:.2f} req/s): {num_outage_failed} requests failed"
    )
    print(f"{'':<10}{'sent':>8}{'ok':>8}{'TTFT p50':>12}{'TTFT p99':>12}")
    for phase in phases:
        print(
            f"{phase.name:<10}{phase.num_sent:>8}{phase.num_ok:>8}"
            f"{_ms(phase.ttft_ms, 'p50'):>12}{_ms(phase.ttft_ms, 'p99'):>12}"
        )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(
                {
                    "command": " ".join(["python -m benchmarks.degrade", *(argv or sys.argv[1:])]),
                    "capacity_rps": capacity,
                    "overload": [asdict(r) for r in runs],
                    "outage": [asdict(p) for p in phases],
                    "outage_failed": num_outage_failed,
                },
                out,
                indent=2,
            )
    ok = num_outage_failed == 0 and all(r.num_other_errors == 0 for r in runs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
