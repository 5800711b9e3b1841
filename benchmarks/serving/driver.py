"""Runs a workload against a router: sends each request at its arrival time, one
stream each, all concurrently, with a progress bar, and returns the records."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from dataclasses import dataclass

import grpc
from tqdm import tqdm

from benchmarks.serving.arrivals import ArrivalProcess
from benchmarks.serving.client import RequestRecord, send
from benchmarks.serving.metrics import Slo, compute_metrics
from benchmarks.serving.result import LoadAverage, RunResult
from benchmarks.serving.workload import BenchRequest, Workload
from protos import generator_pb2_grpc as pb_grpc

# Enough for the longest streams of a CPU run; a stuck request fails, not the run.
REQUEST_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class RunRecords:
    """The records of one run and the wall time it took."""

    records: list[RequestRecord]
    duration_s: float
    """From the first send to the last response."""


async def run_workload(
    target: str,
    workload: Workload,
    arrivals: ArrivalProcess,
    *,
    run_id: str = "bench",
    max_concurrency: int | None = None,
    show_progress: bool = True,
) -> RunRecords:
    """Sends every request of `workload` at its `arrivals` offset and waits for all.
    With `max_concurrency`, a request due while that many are in flight waits for
    one to finish (1 makes the run sequential)."""
    offsets = arrivals.offsets(len(workload.requests))
    limit = asyncio.Semaphore(max_concurrency or len(workload.requests))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        progress = tqdm(
            total=len(workload.requests),
            desc=run_id,
            unit="req",
            file=sys.stderr,
            disable=not show_progress,
        )
        start = time.perf_counter()

        async def one(index: int, request: BenchRequest, offset: float) -> RequestRecord:
            await asyncio.sleep(max(start + offset - time.perf_counter(), 0.0))
            async with limit:
                record = await send(
                    stub, request, index, run_id=run_id, timeout_s=REQUEST_TIMEOUT_S
                )
            progress.update(1)
            return record

        try:
            records = await asyncio.gather(
                *(
                    one(i, request, offset)
                    for i, (request, offset) in enumerate(
                        zip(workload.requests, offsets, strict=True)
                    )
                )
            )
        finally:
            progress.close()
    end = max((r.end_time for r in records if r.end_time is not None), default=start)
    return RunRecords(list(records), end - start)


async def warm_up(target: str, num_requests: int = 2, prompt_len: int = 16) -> None:
    """A few short requests, so first-call costs (allocations, lazy imports, channel
    set-up) stay out of the measured run. Their prompts are a fixed pattern that a
    seeded random workload does not repeat, so they seed no prefix it could reuse."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        for i in range(num_requests):
            prompt = tuple((7 * i + j) % 97 + 100 for j in range(prompt_len))
            record = await send(stub, BenchRequest(prompt, output_len=2), i, run_id="warmup")
            if not record.is_success:
                raise RuntimeError(f"warm-up request failed: {record.error}")


def measure(
    target: str,
    name: str,
    config: dict[str, object],
    workload: Workload,
    arrivals: ArrivalProcess,
    slo: Slo,
    *,
    max_concurrency: int | None = None,
    show_progress: bool = True,
    trial: int = 0,
    load_avg_before: LoadAverage | None = None,
) -> RunResult:
    """Warm-up, then the timed run of `workload` against `target`, with its metrics.
    The machine's load average before (by default: after the warm-up) and at the end
    of the timed run goes into the result: on a shared machine it says how far to
    trust the numbers."""
    asyncio.run(warm_up(target))
    load_avg_before = load_avg_before or os.getloadavg()
    run = asyncio.run(
        run_workload(
            target,
            workload,
            arrivals,
            run_id=name,
            max_concurrency=max_concurrency,
            show_progress=show_progress,
        )
    )
    load_avg_after = os.getloadavg()
    metrics = compute_metrics(run.records, run.duration_s, slo, workload.long_indices)
    return RunResult(name, config, metrics, run.records, trial, load_avg_before, load_avg_after)
