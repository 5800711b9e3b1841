"""One request through a decode worker, as plain async code.

`DecodeFlow.run` admits the request (`DecodeAdmission`), submits it to the engine
loop, and yields what the engine samples for it, coalescing tokens that arrived
while the caller was busy. Leaving early (cancel, deadline, a stop string at the
router) aborts the request in the engine, which frees its blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.context import Context

from decode_worker.admission import DecodeAdmission, DecodeCall
from decode_worker.engine import TokenOutput
from decode_worker.engine_loop import EngineLoop
from model.sampling_params import FinishReason
from rpc.limits import Overloaded
from telemetry import names
from telemetry.metrics import ServiceMetrics
from telemetry.token_timer import TokenTimer

tracer = trace.get_tracer("kvrelay.decode")


class DecodeFailed(Exception):
    """The engine ended the request with an error (`cause`: too large for the pool,
    an invalid request, or a failed step)."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True)
class TokenBatch:
    """Tokens sampled for one request since the previous batch (one DecodeResponse)."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason | None
    """Set on the last batch."""
    num_cached_tokens: int
    """Last batch only: prompt tokens found resident when this worker prefilled it."""
    num_resident_blocks: int = 0
    """First batch only: prompt blocks resident in the pool at admission."""
    num_fetched_blocks: int = 0
    """First batch only: prompt blocks fetched from the store."""
    num_reused_tokens: int = 0
    """First batch only: tokens whose K/V was resident or fetched at admission."""


@dataclass
class DecodeCounters:
    """What the flow counts across requests."""

    num_active: int = 0
    """Requests in the flow now (admitting, queued or generating)."""
    num_resumed_requests_total: int = 0
    num_resumed_computed_tokens_total: int = 0
    """Tokens resumed requests computed on admission (neither resident nor fetched)."""


class DecodeFlow:
    """Decodes requests on one engine loop; event-loop only."""

    def __init__(
        self,
        loop: EngineLoop,
        admission: DecodeAdmission,
        metrics: ServiceMetrics,
        max_queued: int | None = None,
    ) -> None:
        self.loop = loop
        self.admission = admission
        self.metrics = metrics
        self.counters = DecodeCounters()
        self.max_queued = max_queued
        """Requests admitting or waiting at most (None: no bound); past it, Overloaded."""

    @property
    def num_queued(self) -> int:
        """Requests in the flow that are not running in the engine yet."""
        return max(self.counters.num_active - self.loop.stats().num_running, 0)

    async def run(
        self, call: DecodeCall, parent: Context | None = None
    ) -> AsyncIterator[TokenBatch]:
        """Raises Overloaded or InvalidPrompt before the first batch, DecodeFailed at
        any point."""
        if self.max_queued is not None and self.num_queued >= self.max_queued:
            raise Overloaded(
                f"this decode worker has {self.num_queued} requests queued, its "
                f"--max-queued; retry on another"
            )
        # Spans are started, not made current: this is an async generator, and a
        # context attached across a `yield` cannot be detached reliably.
        span = tracer.start_span(names.SPAN_DECODE, context=parent, kind=trace.SpanKind.SERVER)
        span.set_attribute(names.REQUEST_ID, call.request_id)
        timer = TokenTimer(self.metrics)
        generation_span = None
        is_finished, num_tokens = False, 0
        self.counters.num_active += 1
        try:
            admission = await self.admission.admit(call, trace.set_span_in_context(span))
            outputs: asyncio.Queue[TokenOutput | BaseException] = asyncio.Queue()
            event_loop = asyncio.get_running_loop()
            submitted_ns = time.time_ns()
            self.loop.submit(
                admission.request,
                lambda item: event_loop.call_soon_threadsafe(outputs.put_nowait, item),
            )
            generation_span = tracer.start_span(
                names.SPAN_DECODE_GENERATION, context=trace.set_span_in_context(span)
            )
            is_first = True
            while not is_finished:
                outs = [await outputs.get()]
                while not outputs.empty():  # coalesce when the caller reads slower
                    outs.append(outputs.get_nowait())
                error = next((o for o in outs if isinstance(o, BaseException)), None)
                if error is not None:
                    is_finished = True  # the engine already dropped the request
                    raise DecodeFailed(error)
                batch = _token_batch(outs)
                num_tokens += len(batch.token_ids)
                timer.observe(len(outs))
                is_finished = batch.finish_reason is not None
                if is_first:
                    _record_queue_span(span, submitted_ns, outs[0].admitted_ns)
                    generation_span.set_attribute(
                        names.TIME_TO_FIRST_TOKEN_S, time.monotonic() - timer.arrival
                    )
                    batch = dataclasses.replace(
                        batch,
                        num_resident_blocks=admission.num_resident_blocks,
                        num_fetched_blocks=admission.num_fetched_blocks,
                        num_reused_tokens=outs[0].num_reused_tokens,
                    )
                    if call.is_resumed:
                        num_sequence_tokens = len(call.prompt_token_ids) + len(
                            call.generated_token_ids
                        )
                        self.counters.num_resumed_requests_total += 1
                        self.counters.num_resumed_computed_tokens_total += (
                            num_sequence_tokens - outs[0].num_reused_tokens
                        )
                    is_first = False
                yield batch
            timer.finish()
        finally:
            self.counters.num_active -= 1
            if not is_finished:  # cancelled, deadline passed, or the caller left
                self.loop.abort(call.request_id)
            if generation_span is not None:
                generation_span.set_attribute(names.NUM_GENERATED_TOKENS, num_tokens)
                generation_span.end()
            span.end()


def _token_batch(outs: list[TokenOutput]) -> TokenBatch:
    last = outs[-1]
    return TokenBatch(
        token_ids=[out.token_id for out in outs],
        logprobs=[out.logprob for out in outs],
        finish_reason=last.finish_reason,
        num_cached_tokens=last.num_cached_tokens if last.finish_reason is not None else 0,
    )


def _record_queue_span(parent: trace.Span, submitted_ns: int, admitted_ns: int) -> None:
    """The engine thread timed the admission; the wait is recorded as its own span
    (and attribute) under the request's decode span, with those times."""
    queue_span = tracer.start_span(
        names.SPAN_DECODE_QUEUE, context=trace.set_span_in_context(parent), start_time=submitted_ns
    )
    queue_span.end(end_time=max(admitted_ns, submitted_ns))
    parent.set_attribute(names.QUEUE_TIME_S, max(admitted_ns - submitted_ns, 0) / 1e9)
