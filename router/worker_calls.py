"""What the router asks of its workers, with the rules around each call.

- `prefill`: pick a prefill worker; on any failure of that worker (it is gone, it
  failed, it answered nothing within the token timeout) retry once on another,
  and when none is left let the decode worker prefill the prompt itself. The tail
  is leased from the moment each attempt is sent (phase 2 of `kvstore.tail_lease`),
  and each attempt stores its tail under an id of its own.
- `decode_stream`: the decode worker's tokens, as `TokenChunk`s. When a decode
  worker fails before the request finished (an error status, a reset stream, no
  token within the token timeout, the worker declared lost), the request resumes
  on another decode worker with the tokens the client already has; that worker
  fetches what the failed one published and computes only the rest, so the client
  sees a pause, never a duplicated or missing token. At most `max_migrations`.
- `pick_decode`: ask every decode worker how much of the prompt it holds (bounded
  by `RESIDENCY_TIMEOUT_S`, so a slow worker only loses locality), then let the
  routing policy choose among those new work may go to.

Every failure reaches the caller as a `RelayError` with the status the client
should see. The calls go through a `WorkerClient`, so tests drive all of this with
a scripted one and no sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Collection
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

log = logging.getLogger(__name__)
tracer = trace.get_tracer("kvrelay.router")

RESIDENCY_TIMEOUT_S = 0.5
"""How long the router waits for CountResident answers before routing without them."""
ROUTABLE_WAIT_S = 10.0
"""How long a request in flight waits for a decode worker to become routable (one
registering, a stall ending) before it fails: a drain or a restart hands its
requests over in that gap, so they resume instead of failing."""
ROUTABLE_POLL_S = 0.05

# Statuses that say the worker failed (or is gone), not that the request is wrong:
# the request goes to another worker. DEADLINE_EXCEEDED is here only when the token
# timeout, not the request's deadline, bounded the call.
_WORKER_FAILURES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.DATA_LOSS,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)

MAX_PREFILL_ATTEMPTS = 2
"""A prefill is tried on at most this many workers before the decode worker runs it."""


@dataclass(frozen=True)
class FailoverConfig:
    """How long the router waits for workers, and how often it moves a request."""

    request_timeout_s: float = 600.0
    """Every request's deadline when the client sets none (or a later one)."""
    token_timeout_s: float = 60.0
    """A worker that sends no token (a prefill no answer) for this long has failed."""
    max_migrations: int = 3
    """Decode resumes of one request at most; then its error goes to the client."""

    def __post_init__(self) -> None:
        if self.request_timeout_s <= 0 or self.token_timeout_s <= 0:
            raise ValueError("--request-timeout and --token-timeout must be > 0")
        if self.max_migrations < 0:
            raise ValueError(f"--max-migrations must be >= 0, got {self.max_migrations}")


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

    def __init__(
        self, cluster: Cluster, client: WorkerClient, failover: FailoverConfig | None = None
    ) -> None:
        self.cluster = cluster
        self.client = client
        self.failover = failover or FailoverConfig()
        self.num_migrations_total = 0
        """Decode resumes, for `kvrelay:request_migrations_total`."""
        self.num_prefill_retries_total = 0
        """Failed prefill attempts (retried elsewhere or prefilled by the decode
        worker), for `kvrelay:prefill_retries_total`."""
        self._background: set[asyncio.Task] = set()

    def needs_prefill(self, req: PreparedRequest) -> bool:
        """Whether a prefill worker runs the prompt, rather than the decode worker
        (no prefill worker, or a prompt short enough to prefill locally)."""
        decoders = self.cluster.workers(Role.DECODE)
        if not self.cluster.workers(Role.PREFILL) or not decoders:
            return False
        return len(req.prompt_token_ids) > max(w.max_local_prefill_len for w in decoders)

    async def prefill(
        self, req: PreparedRequest, deadline: float, parent: trace.Span
    ) -> Prefilled | None:
        """The first prefill worker that answers; None when every attempt failed, so
        the decode worker prefills the prompt itself."""
        tried: set[str] = set()
        while len(tried) < MAX_PREFILL_ATTEMPTS:
            candidates = [w for w in self.cluster.workers(Role.PREFILL) if w.worker_id not in tried]
            if not candidates:
                break
            entry = self.cluster.policy.pick_prefill(candidates, req.block_hashes)
            tried.add(entry.worker_id)
            attempt_id = f"{req.internal_id}.p{len(tried)}"
            try:
                result, tail = await self._prefill_once(entry, req, attempt_id, deadline, parent)
            except WorkerCallError as err:
                if err.code not in _WORKER_FAILURES:
                    raise RelayError(err.code, f"prefill failed: {err.message}") from err
                _check_deadline(deadline)
                self.num_prefill_retries_total += 1
                log.warning("prefill worker %s failed (%s); retrying", entry.worker_id, err)
                parent.add_event(
                    names.EVENT_PREFILL_RETRY,
                    {names.WORKER_ID: entry.worker_id, names.STATUS_CODE: err.code.name},
                )
                continue
            self.cluster.policy.on_prefilled(entry, req.block_hashes)
            return Prefilled(entry.worker_id, result, tail)
        parent.add_event(names.EVENT_LOCAL_PREFILL, {names.NUM_ATTEMPTS: len(tried)})
        return None

    async def _prefill_once(
        self,
        entry: WorkerEntry,
        req: PreparedRequest,
        attempt_id: str,
        deadline: float,
        parent: trace.Span,
    ) -> tuple[wpb.PrefillResult, TailLease]:
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
                        cache_salt=req.cache_salt,
                    ),
                    self._call_timeout(deadline),
                )
        except BaseException:
            # The worker may have put the tail before it failed or its answer was lost.
            tail.release()
            raise
        finally:
            entry.num_inflight -= 1
        if not result.has_tail:
            tail.hand_over()  # nothing to delete
        return result, tail

    async def decode_stream(
        self,
        req: PreparedRequest,
        prefilled: Prefilled | None,
        deadline: float,
        parent: trace.Span,
    ) -> AsyncIterator[TokenChunk]:
        """The request's tokens from decode workers, resumed on another worker (with
        what the client already has) each time one fails, up to `max_migrations`."""
        generated = [prefilled.result.first_token_id] if prefilled is not None else []
        failed: set[str] = set()
        refused: set[str] = set()  # full (RESOURCE_EXHAUSTED) before sending anything
        num_migrations = 0
        while True:
            worker = await self.pick_decode(req, deadline, avoid=failed | refused)
            parent.set_attribute(names.DECODE_WORKER, worker.worker_id)  # the last one's
            is_resume = num_migrations > 0
            request = wpb.DecodeRequest(
                request_id=f"{req.internal_id}.d{num_migrations + len(refused) + 1}",
                prompt_token_ids=req.prompt_token_ids,
                sampling=sampling_to_proto(req.sampling),
                prefill=prefilled.result if prefilled is not None and not is_resume else None,
                generated_token_ids=generated if is_resume else (),
                cache_salt=req.cache_salt,
            )
            num_sent = len(generated)
            try:
                async for chunk in self._decode_once(worker, request, deadline, parent):
                    generated.extend(chunk.token_ids)
                    yield chunk
                    if chunk.finish_reason is not None:
                        return
                error = RelayError(
                    grpc.StatusCode.UNAVAILABLE, "decode worker ended the stream early"
                )
            except RelayError as err:
                error = err
            if error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and len(generated) == num_sent:
                # A full worker is no failure: try each other one once, then say so.
                refused.add(worker.worker_id)
                routable = {w.worker_id for w in self.cluster.workers(Role.DECODE)}
                if routable <= refused | failed:
                    raise RelayError(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"every decode worker is full; retry later ({error.message})",
                    )
                _check_deadline(deadline)
                continue
            if error.code not in _WORKER_FAILURES or num_migrations >= self.failover.max_migrations:
                raise error
            _check_deadline(deadline)
            if prefilled is not None:
                prefilled.tail.release()  # a resume computes the tail's tokens instead
            num_migrations += 1
            self.num_migrations_total += 1
            failed.add(worker.worker_id)
            log.warning(
                "decode worker %s failed (%s); resuming %s after %d tokens",
                worker.worker_id,
                error.message,
                req.internal_id,
                len(generated),
            )
            parent.add_event(
                names.EVENT_RESUME,
                {
                    names.WORKER_ID: worker.worker_id,
                    names.STATUS_CODE: error.code.name,
                    names.NUM_GENERATED_TOKENS: len(generated),
                },
            )

    async def pick_decode(
        self, req: PreparedRequest, deadline: float, avoid: Collection[str] = ()
    ) -> WorkerEntry:
        """A decode worker for the request, preferring those not in `avoid` (workers
        that failed it); one of those only when no other is left. When none is
        routable (all draining, stalled or gone), waits up to `ROUTABLE_WAIT_S`
        (and never past `deadline`) for one."""
        routable = self.cluster.workers(Role.DECODE)
        if not routable:
            wait_until = min(time.monotonic() + ROUTABLE_WAIT_S, deadline)
            while not routable and time.monotonic() < wait_until:
                await asyncio.sleep(ROUTABLE_POLL_S)
                routable = self.cluster.workers(Role.DECODE)
            if not routable:
                _remaining(deadline)  # DEADLINE_EXCEEDED when that is what ended the wait
                raise RelayError(
                    grpc.StatusCode.UNAVAILABLE,
                    f"no decode worker became routable in {ROUTABLE_WAIT_S:g} s (every one "
                    "is draining, stalled or gone); start one (`kvrelay serve decode`) and retry",
                )
        workers = [w for w in routable if w.worker_id not in avoid] or routable
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

    async def _decode_once(
        self,
        worker: WorkerEntry,
        request: wpb.DecodeRequest,
        deadline: float,
        parent: trace.Span,
    ) -> AsyncIterator[TokenChunk]:
        """One decode call. Each message must come within the token timeout, and the
        call fails at once when the worker is declared lost. Leaving the iteration
        cancels the call, which frees the request's blocks there."""
        timeout_s = _remaining(deadline)
        span = tracer.start_span(
            names.SPAN_DECODE_CALL,
            context=trace.set_span_in_context(parent),
            kind=trace.SpanKind.CLIENT,
        )
        stream = self.client.decode(
            worker.worker_id, request, timeout_s, trace.set_span_in_context(span)
        )
        current: list[asyncio.Timeout] = []  # the wait for the next message
        lost = [False]

        def on_lost() -> None:
            lost[0] = True
            if current:
                current[0].reschedule(asyncio.get_running_loop().time())

        worker.loss_watchers.add(on_lost)
        worker.num_inflight += 1
        try:
            async with contextlib.aclosing(stream):
                while True:
                    # Only the wait is bounded, never the caller's work between messages.
                    try:
                        async with asyncio.timeout(self.failover.token_timeout_s) as wait:
                            current[:] = [wait]
                            if lost[0]:
                                wait.reschedule(asyncio.get_running_loop().time())
                            response = await anext(stream)
                    except StopAsyncIteration:
                        return
                    except TimeoutError:
                        why = (
                            "the worker missed its heartbeats"
                            if lost[0]
                            else f"no token for {self.failover.token_timeout_s:g} s"
                        )
                        raise RelayError(
                            grpc.StatusCode.UNAVAILABLE, f"decode failed: {why}"
                        ) from None
                    finally:
                        current.clear()
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
            worker.loss_watchers.discard(on_lost)
            worker.num_inflight -= 1
            span.end()

    def _call_timeout(self, deadline: float) -> float:
        """A unary call's bound: the token timeout, or what is left of the deadline."""
        return min(_remaining(deadline), self.failover.token_timeout_s)

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


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RelayError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
    return remaining


def _check_deadline(deadline: float) -> None:
    _remaining(deadline)
