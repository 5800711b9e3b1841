"""What the router asks of its workers, with the rules around each call.

- `prefill`: pick a prefill worker, fail over to another when one is gone, and
  hold the tail's lease from the moment the call is sent (phase 2 of
  `kvstore.tail_lease`); each attempt stores its tail under an id of its own.
- `pick_decode`: ask every decode worker how much of the prompt it holds (bounded
  by `RESIDENCY_TIMEOUT_S`, so a slow worker only loses locality), then let the
  routing policy choose.
- `decode`: the decode worker's stream, as `TokenChunk`s.

Every failure reaches the caller as a `RelayError` with the status the client
should see. The calls go through a `WorkerClient`, so tests can drive all of this
with a fake one and no sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from kvstore.tail_lease import TailLease
from protos import workers_pb2 as wpb
from router.cluster import Cluster
from router.registry import Role, WorkerEntry
from router.relay_error import RelayError
from router.request import PreparedRequest
from router.responses import TokenChunk
from router.worker_client import WorkerCallError, WorkerClient
from rpc.sampling_proto import finish_reason_from_proto, sampling_to_proto
from telemetry import names

tracer = trace.get_tracer("kvrelay.router")

RESIDENCY_TIMEOUT_S = 0.5
"""How long the router waits for CountResident answers before routing without them."""


@dataclass(frozen=True)
class Prefilled:
    """A prefill that succeeded: where, what it answered, and its tail's lease
    (already handed over when there is no tail)."""

    worker_id: str
    result: wpb.PrefillResult
    tail: TailLease

    def first_chunk(self) -> TokenChunk:
        """The prefill worker's token, the first of the request's stream."""
        return TokenChunk(
            token_ids=(self.result.first_token_id,),
            logprobs=(self.result.first_logprob,),
            finish_reason=finish_reason_from_proto(self.result.finish_reason),
            num_cached_tokens=self.result.num_cached_tokens,
        )


class WorkerCalls:
    """The router's worker calls over one cluster; event-loop only."""

    def __init__(self, cluster: Cluster, client: WorkerClient) -> None:
        self.cluster = cluster
        self.client = client
        self._background: set[asyncio.Task] = set()

    def needs_prefill(self, req: PreparedRequest) -> bool:
        """Whether a prefill worker runs the prompt, rather than the decode worker
        (no prefill worker, or a prompt short enough to prefill locally)."""
        decoders = self.cluster.workers(Role.DECODE)
        if not self.cluster.workers(Role.PREFILL) or not decoders:
            return False
        return len(req.prompt_token_ids) > max(w.max_local_prefill_len for w in decoders)

    async def prefill(
        self, req: PreparedRequest, deadline: float | None, parent: trace.Span
    ) -> Prefilled:
        """Prefills on one worker after another until one answers; a worker that is
        gone (UNAVAILABLE) is failed over, any other failure is the request's."""
        tried: set[str] = set()
        while True:
            candidates = [w for w in self.cluster.workers(Role.PREFILL) if w.worker_id not in tried]
            if not candidates:
                raise RelayError(
                    grpc.StatusCode.UNAVAILABLE, "no prefill worker could serve the request"
                )
            entry = self.cluster.policy.pick_prefill(candidates, req.block_hashes)
            tried.add(entry.worker_id)
            attempt_id = f"{req.request_id}.p{len(tried)}"
            release = functools.partial(self._release_in_background, entry.worker_id, attempt_id)
            tail = TailLease(release, attempt_id)
            entry.num_inflight += 1
            try:
                with tracer.start_as_current_span(
                    names.SPAN_PREFILL_CALL,
                    context=trace.set_span_in_context(parent),
                    kind=trace.SpanKind.CLIENT,
                ):
                    result = await self.client.prefill(
                        entry.worker_id,
                        wpb.PrefillRequest(
                            request_id=attempt_id,
                            prompt_token_ids=req.prompt_token_ids,
                            sampling=sampling_to_proto(req.sampling),
                        ),
                        _remaining(deadline),
                    )
            except WorkerCallError as err:
                # The worker may have put the tail before it failed or its answer was lost.
                tail.release()
                if err.code == grpc.StatusCode.UNAVAILABLE:
                    continue  # the worker is gone: fail over to another one
                raise RelayError(err.code, f"prefill failed: {err.message}") from err
            except BaseException:  # cancelled, or the deadline passed before the call
                tail.release()
                raise
            finally:
                entry.num_inflight -= 1
            self.cluster.policy.on_prefilled(entry, req.block_hashes)
            if not result.has_tail:
                tail.hand_over()  # nothing to delete
            return Prefilled(entry.worker_id, result, tail)

    async def pick_decode(self, req: PreparedRequest) -> WorkerEntry:
        workers = self.cluster.workers(Role.DECODE)
        if not workers:
            raise RelayError(grpc.StatusCode.UNAVAILABLE, "no decode worker is registered")
        num_resident: dict[str, int] = {}
        if req.block_hashes and len(workers) > 1:
            answers = await asyncio.gather(
                *(
                    self.client.count_resident(w.worker_id, req.block_hashes, RESIDENCY_TIMEOUT_S)
                    for w in workers
                ),
                return_exceptions=True,
            )
            for worker, answer in zip(workers, answers, strict=True):
                if isinstance(answer, int):
                    num_resident[worker.worker_id] = answer
        return self.cluster.policy.pick_decode(workers, num_resident)

    async def decode(
        self,
        worker: WorkerEntry,
        req: PreparedRequest,
        prefilled: Prefilled | None,
        deadline: float | None,
        parent: trace.Span,
    ) -> AsyncIterator[TokenChunk]:
        """The decode worker's tokens. Leaving the iteration cancels the call, which
        frees the request's blocks there."""
        timeout_s = _remaining(deadline)
        span = tracer.start_span(
            names.SPAN_DECODE_CALL,
            context=trace.set_span_in_context(parent),
            kind=trace.SpanKind.CLIENT,
        )
        request = wpb.DecodeRequest(
            request_id=req.request_id,
            prompt_token_ids=req.prompt_token_ids,
            sampling=sampling_to_proto(req.sampling),
            prefill=None if prefilled is None else prefilled.result,
        )
        stream = self.client.decode(
            worker.worker_id, request, timeout_s, trace.set_span_in_context(span)
        )
        worker.num_inflight += 1
        try:
            async with contextlib.aclosing(stream):
                async for response in stream:
                    yield TokenChunk(
                        token_ids=response.token_ids,
                        logprobs=response.logprobs,
                        finish_reason=finish_reason_from_proto(response.finish_reason),
                        num_cached_tokens=response.num_cached_tokens or None,
                    )
        except WorkerCallError as err:
            span.set_status(trace.StatusCode.ERROR, err.message)
            raise RelayError(err.code, f"decode failed: {err.message}") from err
        finally:
            worker.num_inflight -= 1
            span.end()

    def _release_in_background(self, worker_id: str, tail_id: str) -> None:
        """Deletes a tail no decode worker took. Runs as its own task because the
        caller may be a cancelled request, whose own awaits would be cancelled."""

        async def release() -> None:
            # On failure the tail's TTL in the store is the backstop.
            with contextlib.suppress(WorkerCallError):
                await self.client.release(worker_id, tail_id)

        task = asyncio.ensure_future(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def wait_background(self, timeout_s: float) -> None:
        """Waits (at most `timeout_s`) for the releases still running."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=timeout_s)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RelayError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
    return remaining
