"""What the process-level fault tests share: prompts and sampling, the expected
tokens of an uninterrupted run, a stream read in its own thread, and waits and
checks on a `LocalCluster`."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from kvstore.hashing import DEFAULT_BLOCK_SIZE
from protos import generator_pb2 as pb
from tests.cluster.local_cluster import LocalCluster

BLOCK = DEFAULT_BLOCK_SIZE
MAX_TOKENS = 160
PROMPT_LEN = 40  # > max_local_prefill_len: a prefill worker runs it


def prompt(i: int, n: int = PROMPT_LEN) -> list[int]:
    return [3 + (i * 31 + j * 7919) % 250 for j in range(n)]


def greedy(max_tokens: int = MAX_TOKENS) -> pb.SamplingParams:
    return pb.SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


def seeded(seed: int, max_tokens: int = MAX_TOKENS) -> pb.SamplingParams:
    return pb.SamplingParams(
        max_tokens=max_tokens, temperature=0.9, top_p=0.95, seed=seed, ignore_eos=True
    )


def expected_tokens(model: str, requests: list[tuple[list[int], pb.SamplingParams]]):
    """The token ids of an uninterrupted run of each request."""
    from decode_worker.batch_generate import generate_with_engine
    from model.loader import load_model
    from rpc.sampling_proto import sampling_from_proto

    loaded = load_model(model)
    expected = []
    for token_ids, sampling in requests:
        outputs = generate_with_engine(loaded, [token_ids], sampling_from_proto(sampling))
        expected.append([out.token_id for _, out in outputs])
    return expected


class Stream(threading.Thread):
    """One Generate call, read in its own thread; records tokens as they arrive."""

    def __init__(self, cluster: LocalCluster, token_ids: list[int], sampling, **fields) -> None:
        super().__init__(daemon=True)
        self.request = pb.GenerateRequest(prompt_token_ids=token_ids, sampling=sampling, **fields)
        self.cluster = cluster
        self.token_ids: list[int] = []
        self.responses: list[pb.GenerateResponse] = []
        self.error: grpc.RpcError | None = None
        self.ended_at: float | None = None
        """time.monotonic() when the stream ended."""
        self.start()

    def run(self) -> None:
        try:
            for response in self.cluster.generator.Generate(self.request, timeout=120):
                self.responses.append(response)
                self.token_ids.extend(response.token_ids)
        except grpc.RpcError as err:
            self.error = err
        finally:
            self.ended_at = time.monotonic()

    def result(self, timeout_s: float = 120) -> list[int]:
        self.join(timeout_s)
        assert not self.is_alive(), "the stream did not end"
        assert self.error is None, f"{self.error.code()}: {self.error.details()}"
        return self.token_ids


def wait_until(condition, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.005)


def assert_back_to_baseline(cluster: LocalCluster, timeout_s: float = 15.0) -> None:
    """Every registered worker idle: nothing queued or running, no used block, no live
    tail (the dead workers must have left the registry first)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = {}
        for worker_id in cluster.workers():
            stats = cluster.stats(worker_id)
            state[worker_id] = (
                stats.num_waiting,
                stats.num_running,
                stats.num_used_blocks,
                stats.num_live_tails,
            )
        if all(v == (0, 0, 0, 0) for v in state.values()):
            return
        if time.monotonic() > deadline:
            pytest.fail(f"workers not back to baseline: {state}")
        time.sleep(0.1)


def wait_gone(cluster: LocalCluster, worker_id: str, timeout_s: float = 20.0) -> None:
    """Until the router dropped `worker_id` (it deregistered or expired)."""
    wait_until(lambda: worker_id not in cluster.workers(), timeout_s, f"{worker_id} to leave")


def with_max_tokens(sampling: pb.SamplingParams, max_tokens: int) -> pb.SamplingParams:
    changed = pb.SamplingParams()
    changed.CopyFrom(sampling)
    changed.max_tokens = max_tokens
    return changed


def metric_value(exposition: str, name: str) -> float:
    """The value of the one series of counter `name` in Prometheus text."""
    (value,) = [
        float(line.rsplit(" ", 1)[1])
        for line in exposition.splitlines()
        if line.startswith(name + "{")
    ]
    return value
