"""One `Generate` stream per request, with a timestamp on every message.

Timestamps are `time.perf_counter()` seconds taken as each message is received.
A message may carry several tokens; each of them is counted at its message's
time (no spreading), so a k-token message contributes one inter-token gap and
k - 1 gaps of zero. The router relays one decode step per message, so k is 1 in
practice; `RequestRecord.token_times` keeps the raw per-token times either way.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import grpc

from benchmarks.serving.workload import BenchRequest
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc


@dataclass
class RequestRecord:
    """What happened to one request (filled in while its stream runs)."""

    index: int
    """Position of the request in its workload."""
    send_time: float
    """perf_counter seconds when the call was started."""
    token_times: list[float] = field(default_factory=list)
    """perf_counter seconds of every received token, in order."""
    end_time: float | None = None
    """perf_counter seconds of the last message (or of the error)."""
    num_prompt_tokens: int = 0
    """usage.prompt_tokens of the last message."""
    num_cached_prompt_tokens: int = 0
    """usage.cached_prompt_tokens: prompt tokens reused from the prefix cache."""
    error: str = ""
    """Empty on success; else the gRPC status and details."""
    token_ids: list[int] = field(default_factory=list)
    """The generated tokens, in order (to compare runs' outputs)."""

    @property
    def is_success(self) -> bool:
        return not self.error and self.end_time is not None and bool(self.token_times)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_times)


def generate_request(request: BenchRequest, request_id: str) -> pb.GenerateRequest:
    """The wire request: fixed max_tokens, EOS ignored, greedy."""
    return pb.GenerateRequest(
        request_id=request_id,
        prompt=request.prompt,
        prompt_token_ids=request.prompt_token_ids,
        sampling=pb.SamplingParams(max_tokens=request.output_len, ignore_eos=True),
    )


async def send(
    stub: pb_grpc.GeneratorStub,
    request: BenchRequest,
    index: int,
    *,
    run_id: str = "bench",
    timeout_s: float | None = None,
) -> RequestRecord:
    """Streams one request to the end; failures are recorded, never raised."""
    record = RequestRecord(index=index, send_time=time.perf_counter())
    call = stub.Generate(generate_request(request, f"{run_id}-{index}"), timeout=timeout_s)
    try:
        async for message in call:
            now = time.perf_counter()
            record.token_times.extend([now] * len(message.token_ids))
            record.token_ids.extend(message.token_ids)
            record.end_time = now
            if message.HasField("usage"):
                record.num_prompt_tokens = message.usage.prompt_tokens
                record.num_cached_prompt_tokens = message.usage.cached_prompt_tokens
    except grpc.aio.AioRpcError as err:
        record.error = f"{err.code().name}: {err.details()}"
        record.end_time = time.perf_counter()
    return record
