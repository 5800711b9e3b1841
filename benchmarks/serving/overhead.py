"""The cluster's overhead: TTFT of a short prompt through a disaggregated cluster
minus the TTFT of the same model run in this process (`DecodeEngine`: prefill and
first token, no network), measured in the same invocation.

Trials are sequential and interleaved (cluster, then local, per prompt), so there is
no contention and background load hits both alike. Each trial has its own prompt,
so neither side finds it cached. The local engine runs with one torch thread on the
first core, the core the cluster's prefill worker uses (idle meanwhile).
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time

import grpc
from tqdm import tqdm

from benchmarks.serving.client import RequestRecord, send
from benchmarks.serving.launcher import BenchCluster, disaggregated_layout
from benchmarks.serving.metrics import Slo, compute_metrics
from benchmarks.serving.result import RunResult, trial_metrics
from benchmarks.serving.trials import Goal, GoalResult, check_goal
from benchmarks.serving.workload import TOKEN_ID_LIMIT, BenchRequest, Workload
from protos import generator_pb2_grpc as pb_grpc

GOAL_MS = 5.0
# Through the cluster the request also decodes a few tokens, so the measured first
# token took the real path (prefill worker, then decode worker), not a shortcut.
CLUSTER_OUTPUT_LEN = 4
NUM_WARMUP_TRIALS = 3


def overhead_workload(num_trials: int, prompt_len: int, seed: int = 0) -> Workload:
    rng = random.Random(seed)
    requests = tuple(
        BenchRequest(
            tuple(rng.randrange(TOKEN_ID_LIMIT) for _ in range(prompt_len)),
            output_len=CLUSTER_OUTPUT_LEN,
        )
        for _ in range(num_trials)
    )
    params = {"num_trials": num_trials, "prompt_len": prompt_len, "seed": seed}
    return Workload("overhead", requests, params)


class LocalEngineProbe:
    """Times prefill + first token of one prompt in an in-process `DecodeEngine`."""

    def __init__(self, model: str, core: int) -> None:
        import torch

        from decode_worker.engine import DecodeEngine
        from decode_worker.engine_config import EngineConfig
        from model.loader import load_model

        torch.set_num_threads(1)
        self.core = core
        loaded = load_model(model, dtype=torch.float32)
        self.engine = DecodeEngine(
            loaded, EngineConfig(kv_cache_bytes=256 * 1024**2), b"bench-overhead"
        )
        self.num_calls = 0

    def first_token(self, prompt: tuple[int, ...], index: int) -> RequestRecord:
        from decode_worker.engine import EngineRequest
        from model.sampling_params import SamplingParams

        # Only this thread is pinned (pid 0); it is put back as it was afterwards.
        allowed = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {self.core})
        try:
            self.num_calls += 1
            request_id = f"local-{self.num_calls}"
            start = time.perf_counter()
            self.engine.add_request(
                EngineRequest(request_id, prompt, SamplingParams(max_tokens=1, ignore_eos=True))
            )
            while not any(out.request_id == request_id for out in self.engine.step()):
                pass
            end = time.perf_counter()
        finally:
            os.sched_setaffinity(0, allowed)
        return RequestRecord(index, start, [end], end_time=end, num_prompt_tokens=len(prompt))


async def _trials(
    target: str, probe: LocalEngineProbe, workload: Workload, show_progress: bool
) -> tuple[list[RequestRecord], list[RequestRecord]]:
    cluster_records, local_records = [], []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.GeneratorStub(channel)
        warmup = overhead_workload(NUM_WARMUP_TRIALS, len(workload.requests[0].prompt_token_ids), 1)
        for i, request in enumerate(warmup.requests):
            await send(stub, request, i, run_id="warmup")
            probe.first_token(request.prompt_token_ids, i)
        for i, request in enumerate(
            tqdm(workload.requests, desc="overhead", file=sys.stderr, disable=not show_progress)
        ):
            cluster_records.append(await send(stub, request, i, run_id="overhead"))
            local_records.append(probe.first_token(request.prompt_token_ids, i))
    return cluster_records, local_records


def run_overhead(
    model: str,
    cores: tuple[int, ...],
    num_trials: int,
    prompt_len: int = 16,
    *,
    show_progress: bool = True,
) -> tuple[Workload, list[RunResult], list[GoalResult]]:
    """Local engine (baseline) vs cluster (candidate) p50 TTFT; goal: difference <= 5 ms.
    Its trials are the prompts, so the comparison itself is one trial."""
    workload = overhead_workload(num_trials, prompt_len)
    layout = disaggregated_layout(model, cores, name="cluster")
    probe = LocalEngineProbe(model, cores[0])
    load_avg_before = os.getloadavg()
    with BenchCluster(layout) as cluster:
        cluster_records, local_records = asyncio.run(
            _trials(cluster.target, probe, workload, show_progress)
        )
        load_avg_after = os.getloadavg()
    runs = []
    for name, config, records in (
        ("local-engine", {"model": model, "core": cores[0], "threads": 1}, local_records),
        ("cluster", layout.describe(), cluster_records),
    ):
        # Sequential trials: the sum of their times is the run's duration.
        duration = sum((r.end_time or r.send_time) - r.send_time for r in records)
        metrics = compute_metrics(records, duration, Slo())
        runs.append(RunResult(name, config, metrics, records, 0, load_avg_before, load_avg_after))
    goal = Goal("ttft_ms.p50", "cluster", "local-engine", by="difference", at_most=GOAL_MS)
    return workload, runs, [check_goal(goal, trial_metrics(runs))]
