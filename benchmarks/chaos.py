"""`python -m benchmarks.chaos`: serving while workers die, next to serving while
none does.

Two runs of the same requests (Poisson arrivals, short prompts with a long one every
few), each on a fresh cluster of `kvrelay serve` processes (a router, 2 prefill and
3 decode workers, a redis-server of its own):

1. fault-free;
2. with a fault every `--fault-interval` seconds: a random worker gets SIGKILL or
   SIGTERM (it drains), and is started again once it has exited.

It reports requests ok and failed, how many outputs are identical to the fault-free
run's (greedy, so they must all be), the router's resumes, and p50/p99 TTFT and ITL
of both runs. Goals: every request succeeds with an identical output, and the p99
ITL under faults is at most 3x the fault-free one.

Then, on the fault-free cluster, the cost of one resume: a decode worker continues a
sequence whose full blocks another decode worker computed and published (a fetch
plus the last partial block), against a decode worker computing the same sequence
from nothing, against computing only a partial block. Interleaved trials, medians.

    python -m benchmarks.chaos                      # 3 minutes of faults, dummy:135m
    python -m benchmarks.chaos --duration 60 --fault-interval 10 --json chaos.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field

import grpc

from benchmarks.serving.arrivals import ArrivalProcess
from benchmarks.serving.client import RequestRecord
from benchmarks.serving.driver import run_workload, warm_up
from benchmarks.serving.launcher import BenchCluster, ClusterLayout, free_port
from benchmarks.serving.metrics import BenchMetrics, Slo, compute_metrics
from benchmarks.serving.workload import Workload, mixed_workload
from kvstore.hashing import hash_token_blocks
from protos import generator_pb2 as pb
from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc

WORKERS = ("prefill-0", "prefill-1", "decode-0", "decode-1", "decode-2")
DRAIN_TIMEOUT_S = 5.0
EXIT_TIMEOUT_S = DRAIN_TIMEOUT_S + 20.0
REGISTER_TIMEOUT_S = 90.0
ITL_P99_GOAL = 3.0


@dataclass
class Fault:
    at_s: float
    """Seconds after the run started."""
    worker: str
    signal: str
    exit_code: int | None = None
    exit_s: float | None = None
    """From the signal to the process's exit."""
    back_s: float | None = None
    """From the signal to the restarted worker's registration."""


@dataclass
class RunReport:
    name: str
    metrics: BenchMetrics
    migrations: int
    """Decode streams resumed on another decode worker."""
    prefill_retries: int
    """Prefill attempts that failed and were tried again (or prefilled by decode)."""
    records: list[RequestRecord]
    faults: list[Fault] = field(default_factory=list)
    load_avg: tuple[float, float] = (0.0, 0.0)
    """1-minute load average before and after the run."""


class FaultInjector(threading.Thread):
    """Every `interval_s`: a random running worker gets SIGKILL or SIGTERM and is
    started again once it exited (each fault on its own thread, so the cadence holds
    however long a restart takes). A role's last running worker is never chosen."""

    def __init__(self, cluster: BenchCluster, interval_s: float, seed: int) -> None:
        super().__init__(name="faults", daemon=True)
        self.cluster = cluster
        self.interval_s = interval_s
        self.rng = random.Random(seed)
        self.faults: list[Fault] = []
        self.stop = threading.Event()
        self.start_time = time.monotonic()
        self._down: set[str] = set()
        self._lock = threading.Lock()
        self._recoveries: list[threading.Thread] = []

    def run(self) -> None:
        while not self.stop.wait(self.interval_s):
            with self._lock:
                up = [w for w in WORKERS if w not in self._down]
            candidates = [w for w in up if sum(o.split("-")[0] == w.split("-")[0] for o in up) > 1]
            if not candidates:
                continue
            worker = self.rng.choice(candidates)
            sig = self.rng.choice((signal.SIGKILL, signal.SIGTERM))
            fault = Fault(round(time.monotonic() - self.start_time, 1), worker, sig.name)
            self.faults.append(fault)
            print(f"chaos: {fault.at_s:6.1f} s  {sig.name} {worker}", file=sys.stderr)
            with self._lock:
                self._down.add(worker)
            recovery = threading.Thread(target=self._recover, args=(fault, sig), daemon=True)
            recovery.start()
            self._recoveries.append(recovery)

    def finish(self) -> None:
        """Stops injecting and waits for the workers down to be back."""
        self.stop.set()
        self.join(self.interval_s + 1)
        for recovery in self._recoveries:
            recovery.join(EXIT_TIMEOUT_S + REGISTER_TIMEOUT_S)

    def _recover(self, fault: Fault, sig: signal.Signals) -> None:
        old_address = None
        with contextlib.suppress(grpc.RpcError):
            old_address = self.cluster.registered_workers().get(fault.worker)
        signaled = time.monotonic()
        self.cluster.signal(fault.worker, sig)
        process = self.cluster.processes[fault.worker]
        try:
            fault.exit_code = process.wait(EXIT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.cluster.signal(fault.worker, signal.SIGKILL)
            fault.exit_code = process.wait()
        fault.exit_s = round(time.monotonic() - signaled, 2)
        self.cluster.restart(fault.worker)
        deadline = time.monotonic() + REGISTER_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(grpc.RpcError):
                # The new process binds a new port: its registration, not the dead one's.
                address = self.cluster.registered_workers().get(fault.worker)
                if address is not None and address != old_address:
                    fault.back_s = round(time.monotonic() - signaled, 2)
                    break
            time.sleep(0.2)
        with self._lock:
            self._down.discard(fault.worker)


def _layout(model: str, name: str, metrics_port: int) -> ClusterLayout:
    cores = tuple(sorted(os.sched_getaffinity(0)))
    pick = [cores[i % len(cores)] for i in range(5)]
    return ClusterLayout(
        name=name,
        model=model,
        prefill_cores=tuple(pick[:2]),
        decode_cores=tuple(pick[2:]),
        kv_cache_gb=0.5,
        extra_worker_args=("--drain-timeout", str(DRAIN_TIMEOUT_S)),
        extra_router_args=("--metrics-port", str(metrics_port)),
    )


def _router_counter(metrics_port: int, name: str) -> int:
    """A counter of the router's `/metrics` (e.g. `kvrelay:request_migrations_total`)."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + "{"):
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


def _serve_run(
    args: argparse.Namespace, workload: Workload, name: str, with_faults: bool
) -> tuple[RunReport, BenchCluster | None]:
    metrics_port = free_port()
    cluster = BenchCluster(_layout(args.model, name, metrics_port))
    try:
        cluster.start()
        asyncio.run(warm_up(cluster.target))
        load_before = os.getloadavg()[0]
        injector = FaultInjector(cluster, args.fault_interval, args.seed) if with_faults else None
        if injector is not None:
            injector.start()
        arrivals = ArrivalProcess(rate=args.request_rate, seed=args.seed)
        run = asyncio.run(run_workload(cluster.target, workload, arrivals, run_id=name))
        if injector is not None:
            injector.finish()
        report = RunReport(
            name,
            compute_metrics(run.records, run.duration_s, Slo()),
            _router_counter(metrics_port, "kvrelay:request_migrations_total"),
            _router_counter(metrics_port, "kvrelay:prefill_retries_total"),
            run.records,
            injector.faults if injector is not None else [],
            (load_before, os.getloadavg()[0]),
        )
    except BaseException:
        cluster.stop()
        raise
    if with_faults:
        cluster.stop()
        return report, None
    return report, cluster  # kept for the resume-cost trials


@dataclass
class ResumeCost:
    sequence_len: int
    num_trials: int
    recompute_ms: float
    """Median time to the next token, computing the whole sequence."""
    resume_ms: float
    """Median time to the next token, fetching the published blocks (other worker)."""
    partial_block_ms: float
    """Median time to the next token for a sequence of just the last partial block."""
    fetch_ms: float
    """Median time of one store get of the sequence's full blocks, from this process."""
    trials_within_bound: int
    """Trials whose resume took at most their partial block plus their fetch."""
    num_fetched_blocks: int
    num_computed_tokens: int
    resume_ms_all: list[float]
    recompute_ms_all: list[float]


def _resume_cost(cluster: BenchCluster, num_trials: int, length: int, seed: int) -> ResumeCost:
    """Direct Decode calls, as the router makes them on a resume."""
    with grpc.insecure_channel(cluster.internal_target) as channel:
        workers = wgrpc.RegistryStub(channel).ListWorkers(wpb.ListWorkersRequest(), timeout=5)
    decoders = sorted(
        (w for w in workers.workers if w.role == wpb.WORKER_ROLE_DECODE),
        key=lambda w: w.worker_id,
    )
    channels = [grpc.insecure_channel(w.address) for w in decoders[:3]]
    first, other, third = (wgrpc.DecodeWorkerStub(c) for c in channels)
    rng = random.Random(seed)
    store = _open_store(cluster)
    block = store.spec.block_size
    partial_len = length % block or block
    recompute, resume, partial, fetch = [], [], [], []
    fetched = computed = 0

    def call(stub, tokens: list[int], num_prompt: int, request_id: str):
        request = wpb.DecodeRequest(
            request_id=request_id,
            prompt_token_ids=tokens[:num_prompt],
            generated_token_ids=tokens[num_prompt:],
            sampling=pb.SamplingParams(
                max_tokens=len(tokens) - num_prompt + 1, temperature=0.0, ignore_eos=True
            ),
        )
        started = time.perf_counter()
        responses = list(stub.Decode(request, timeout=120))
        return (time.perf_counter() - started) * 1e3, responses[0]

    for trial in range(num_trials):
        tokens = [rng.randrange(3, 256) for _ in range(length)]
        num_prompt = length * 3 // 4
        ms, _ = call(first, tokens, num_prompt, f"cost-{seed}-{trial}-full")
        recompute.append(ms)
        time.sleep(0.5)  # the first worker's publisher puts the blocks it computed
        ms, response = call(other, tokens, num_prompt, f"cost-{seed}-{trial}-resume")
        resume.append(ms)
        fetched, computed = response.num_fetched_blocks, length - response.num_reused_tokens
        hashes = hash_token_blocks(tokens[:-1], block, store.spec.fingerprint)
        started = time.perf_counter()
        found = store.get(hashes)
        fetch.append((time.perf_counter() - started) * 1e3)
        assert all(kv is not None for kv in found), "the published blocks are not all there"
        short = [rng.randrange(3, 256) for _ in range(partial_len)]
        ms, _ = call(third, short, max(partial_len - 1, 1), f"cost-{seed}-{trial}-partial")
        partial.append(ms)
    for c in channels:
        c.close()
    store.close()
    within = sum(r <= p + f for r, p, f in zip(resume, partial, fetch, strict=True))
    return ResumeCost(
        sequence_len=length,
        num_trials=num_trials,
        recompute_ms=statistics.median(recompute),
        resume_ms=statistics.median(resume),
        partial_block_ms=statistics.median(partial),
        fetch_ms=statistics.median(fetch),
        trials_within_bound=within,
        num_fetched_blocks=fetched,
        num_computed_tokens=computed,
        resume_ms_all=[round(v, 1) for v in resume],
        recompute_ms_all=[round(v, 1) for v in recompute],
    )


def _open_store(cluster: BenchCluster):
    """The cluster's store, for blocks of its model (as its workers open it)."""
    import torch

    from kvstore import BlockSpec, open_store
    from model.sources import config_for_model, model_identity

    model = cluster.layout.model
    config = config_for_model(model)
    return open_store(
        cluster.store_url, BlockSpec.for_model(model_identity(model), config, torch.float32)
    )


def _table(clean: RunReport, chaos: RunReport, identical: int) -> str:
    def row(label: str, a, b, ratio: bool = False) -> str:
        extra = f"  {b / a:5.2f}x" if ratio and a else ""
        return f"{label:<22}{a!s:>14}{b!s:>14}{extra}"

    m0, m1 = clean.metrics, chaos.metrics
    lines = [
        f"{'':<22}{'fault-free':>14}{'faults':>14}",
        row("requests ok", m0.num_completed, m1.num_completed),
        row("requests failed", m0.num_failed, m1.num_failed),
        row("outputs identical", "-", f"{identical}/{m1.num_requests}"),
        row("faults", 0, len(chaos.faults)),
        row("decode resumes", clean.migrations, chaos.migrations),
        row("prefill retries", clean.prefill_retries, chaos.prefill_retries),
    ]
    for label, s0, s1 in (("TTFT", m0.ttft_ms, m1.ttft_ms), ("ITL", m0.itl_ms, m1.itl_ms)):
        for q in ("p50", "p99"):
            a, b = getattr(s0, q), getattr(s1, q)
            lines.append(row(f"{label} {q} (ms)", round(a, 1), round(b, 1), ratio=True))
    lines.append(row("load avg before/after", _pair(clean.load_avg), _pair(chaos.load_avg)))
    return "\n".join(lines)


def _pair(values: tuple[float, float]) -> str:
    return f"{values[0]:.1f}/{values[1]:.1f}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.chaos",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="dummy:135m")
    parser.add_argument("--duration", type=float, default=180.0, help="seconds of arrivals")
    parser.add_argument("--fault-interval", type=float, default=20.0, help="seconds")
    parser.add_argument("--request-rate", type=float, default=0.5, help="requests per second")
    parser.add_argument("--short-len", type=int, default=64)
    parser.add_argument("--long-len", type=int, default=512)
    parser.add_argument("--long-every", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--resume-trials", type=int, default=7)
    parser.add_argument("--resume-len", type=int, default=600, help="tokens per sequence")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", metavar="PATH", help="write the results here")
    args = parser.parse_args(argv)

    num_prompts = max(1, round(args.duration * args.request_rate))
    workload = mixed_workload(
        num_prompts, args.short_len, args.long_len, args.long_every, args.output_len, args.seed
    )
    clean, cluster = _serve_run(args, workload, "fault-free", with_faults=False)
    try:
        cost = _resume_cost(cluster, args.resume_trials, args.resume_len, args.seed)
    finally:
        cluster.stop()
    chaos, _ = _serve_run(args, workload, "faults", with_faults=True)

    identical = sum(
        a.is_success and b.is_success and a.token_ids == b.token_ids
        for a, b in zip(clean.records, chaos.records, strict=True)
    )
    print(_table(clean, chaos, identical))
    itl_ratio = chaos.metrics.itl_ms.p99 / clean.metrics.itl_ms.p99
    all_ok = chaos.metrics.num_failed == 0 and identical == chaos.metrics.num_requests
    print(
        f"\nresume of a {cost.sequence_len}-token sequence (median of {cost.num_trials}): "
        f"{cost.resume_ms:.1f} ms (fetched {cost.num_fetched_blocks} blocks, computed "
        f"{cost.num_computed_tokens} tokens) vs full recompute {cost.recompute_ms:.1f} ms "
        f"({cost.recompute_ms / cost.resume_ms:.1f}x); a partial block alone "
        f"{cost.partial_block_ms:.1f} ms + one store get of the blocks {cost.fetch_ms:.1f} ms; "
        f"{cost.trials_within_bound}/{cost.num_trials} trials within that bound"
    )
    print(
        f"goals: all ok and identical: {'met' if all_ok else 'MISSED'}; "
        f"p99 ITL {itl_ratio:.2f}x fault-free (goal <= {ITL_P99_GOAL:g}x): "
        f"{'met' if itl_ratio <= ITL_P99_GOAL else 'MISSED'}"
    )
    if args.json:
        document = {
            "command": " ".join(["python -m benchmarks.chaos", *(argv or sys.argv[1:])]),
            "workload": workload.params,
            "request_rate": args.request_rate,
            "fault_interval_s": args.fault_interval,
            "runs": {
                r.name: {
                    "metrics": r.metrics.to_dict(),
                    "migrations": r.migrations,
                    "prefill_retries": r.prefill_retries,
                    "faults": [asdict(f) for f in r.faults],
                    "load_avg": r.load_avg,
                }
                for r in (clean, chaos)
            },
            "identical_outputs": identical,
            "itl_p99_ratio": itl_ratio,
            "resume_cost": asdict(cost),
        }
        with open(args.json, "w") as out:
            json.dump(document, out, indent=2)
    return 0 if all_ok and itl_ratio <= ITL_P99_GOAL else 1


if __name__ == "__main__":
    sys.exit(main())
