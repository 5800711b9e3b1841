"""One request's trip through the cluster, as the router runs it.

`RequestRelay.generate` is the request path of docs/architecture.md, top to bottom:
admit, prepare (validate, tokenize, hash; in a thread), prefill on a prefill worker unless the
decode worker will, pick the decode worker that holds most of the prompt, then one
emit loop turns the request's stream of token chunks (the prefill worker's token
first, then the decode worker's) into responses. Cancelling the caller's task
cancels whichever worker call is in flight; the tail's lease deletes a tail no
decode worker took.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.context import Context

from model.tokenizer import IncrementalDetokenizer, Tokenizer
from protos import generator_pb2 as pb
from router.chat_prompt import ChatPrompts
from router.cluster import Cluster
from router.registry import Role
from router.relay_error import RelayError
from router.request import PreparedRequest, prepare
from router.responses import ResponseEmitter, TokenChunk
from router.validation import RequestLimits
from router.worker_calls import FailoverConfig, WorkerCalls
from router.worker_client import WorkerClient
from telemetry import names
from telemetry.metrics import ServiceMetrics, Snapshot
from telemetry.token_timer import TokenTimer

tracer = trace.get_tracer("kvrelay.router")


@dataclass
class RelayStats:
    """Counters the router's metrics and tests read."""

    num_inflight: int = 0
    num_finished: int = 0
    num_rejected: int = 0
    num_prompt_tokens_total: int = 0
    num_cached_prompt_tokens_total: int = 0
    num_generated_tokens_total: int = 0

    def snapshot(self) -> Snapshot:
        return Snapshot(
            num_requests_running=self.num_inflight,
            prompt_tokens_total=self.num_prompt_tokens_total,
            cached_prompt_tokens_total=self.num_cached_prompt_tokens_total,
            generation_tokens_total=self.num_generated_tokens_total,
            admission_rejections_total=self.num_rejected,
        )


class RequestRelay:
    """Runs requests across the cluster's workers; event-loop only."""

    def __init__(
        self,
        cluster: Cluster,
        client: WorkerClient,
        tokenizer: Tokenizer | None,
        limits: RequestLimits,
        max_inflight: int,
        metrics: ServiceMetrics,
        failover: FailoverConfig | None = None,
        chat: ChatPrompts | None = None,
    ) -> None:
        self.cluster = cluster
        self.calls = WorkerCalls(cluster, client, failover)
        self.is_draining = False
        """Set when the router drains: new requests are refused with UNAVAILABLE."""
        self.tokenizer = tokenizer
        self.chat = chat
        """The model's chat template, compiled once; None: requests with messages are refused."""
        self.limits = limits
        self.max_inflight = max_inflight
        self.stats = RelayStats()
        self.metrics = metrics
        metrics.report(self._snapshot)

    async def generate(
        self,
        request: pb.GenerateRequest,
        time_remaining: float | None,
        parent: Context | None = None,
        *,
        key_salt: str | None = None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The whole request. Raises InvalidRequest or RelayError before the first
        message, RelayError after it. `key_salt`: the caller's own prefix-cache scope,
        for a router that derives one per API key (`router.request.prepare`)."""
        timer = TokenTimer(self.metrics)
        # Every request has a deadline: the client's, or the router's request timeout.
        timeout_s = self.calls.failover.request_timeout_s
        if time_remaining is not None:
            timeout_s = min(timeout_s, time_remaining)
        deadline = timer.arrival + timeout_s
        # Started, not made current: this is an async generator (see outgoing_metadata).
        span = tracer.start_span(names.SPAN_GENERATE, context=parent, kind=trace.SpanKind.SERVER)
        try:
            with self._admitted():
                req = await self._prepare(request, key_salt)
                _set_request_attributes(
                    span, self.cluster.model_name, req, is_chat=bool(request.messages)
                )
                self.stats.num_prompt_tokens_total += len(req.prompt_token_ids)
                detokenizer = IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None
                emitter = ResponseEmitter(
                    req.request_id, req.sampling, len(req.prompt_token_ids), detokenizer
                )
                try:
                    chunks = self._token_chunks(req, deadline, span)
                    async with contextlib.aclosing(chunks):
                        async for chunk in chunks:
                            message = emitter.add(chunk)
                            timer.observe(len(chunk.token_ids))
                            self.stats.num_generated_tokens_total += len(chunk.token_ids)
                            if message is not None:
                                yield message
                            if emitter.is_finished:
                                # Leaving the stream cancels the decode call: its blocks are freed.
                                self.stats.num_cached_prompt_tokens_total += (
                                    emitter.cached_prompt_tokens
                                )
                                timer.finish()
                                return
                    raise RelayError(
                        grpc.StatusCode.INTERNAL, "the decode stream ended without a finish"
                    )
                finally:
                    _set_outcome_attributes(span, emitter)
        except Exception as err:
            span.set_status(trace.StatusCode.ERROR, str(err))
            raise
        finally:
            span.end()

    async def _token_chunks(
        self, req: PreparedRequest, deadline: float, span: trace.Span
    ) -> AsyncIterator[TokenChunk]:
        """The request's tokens as they reach the router: the prefill worker's first
        (when one ran the prompt), then the decode workers'."""
        prefilled = None
        if self.calls.needs_prefill(req):
            prefilled = await self.calls.prefill(req, deadline, span)
        if prefilled is not None:
            span.set_attribute(names.PREFILL_WORKER, prefilled.worker_id)
        # The router owns the tail until the decode worker's first message (the lease
        # releases it however this generator ends before that).
        with prefilled.tail if prefilled else contextlib.nullcontext():
            if prefilled is not None:
                yield prefilled.first_chunk()
            async for chunk in self.calls.decode_stream(req, prefilled, deadline, span):
                if prefilled is not None:
                    prefilled.tail.hand_over()
                yield chunk

    @contextlib.contextmanager
    def _admitted(self):
        """Counts the request in flight; RESOURCE_EXHAUSTED past the limit."""
        if self.is_draining:
            raise RelayError(
                grpc.StatusCode.UNAVAILABLE, "the router is shutting down; retry on another"
            )
        if self.stats.num_inflight >= self.max_inflight:
            self.stats.num_rejected += 1
            raise RelayError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the router is serving {self.max_inflight} requests, its limit; retry later",
            )
        self.stats.num_inflight += 1
        try:
            yield
        finally:
            self.stats.num_inflight -= 1
            self.stats.num_finished += 1

    async def _prepare(self, request: pb.GenerateRequest, key_salt: str | None) -> PreparedRequest:
        """`prepare` in a thread: rendering a chat template and tokenizing a long prompt
        take up to a second of CPU, which on the event loop would stall every other
        stream (the tokenizer releases the GIL, `model.tokenizer.HFTokenizer`). The
        thread cannot be stopped, so a cancelled request waits for it before it gives
        its admission slot back: tokenizations never outnumber `max_inflight`."""
        model = self.cluster.model
        if model is None or not self.cluster.workers(Role.DECODE):
            raise RelayError(
                grpc.StatusCode.UNAVAILABLE,
                "no decode worker is registered yet; start one (`kvrelay serve decode`) and retry",
            )
        work = asyncio.ensure_future(
            asyncio.to_thread(
                prepare, request, self.limits, model, self.tokenizer, self.chat, key_salt=key_salt
            )
        )
        try:
            return await asyncio.shield(work)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await work  # nobody wants its result or its error any more
            raise

    def _snapshot(self) -> Snapshot:
        return dataclasses.replace(
            self.stats.snapshot(),
            request_migrations_total=self.calls.num_migrations_total,
            prefill_retries_total=self.calls.num_prefill_retries_total,
        )


def _set_request_attributes(
    span: trace.Span, model: str, req: PreparedRequest, is_chat: bool
) -> None:
    span.set_attribute(names.GEN_AI_OPERATION_NAME, "chat" if is_chat else "text_completion")
    span.set_attribute(names.GEN_AI_REQUEST_MODEL, model)
    span.set_attribute(names.GEN_AI_REQUEST_MAX_TOKENS, req.sampling.max_tokens)
    span.set_attribute(names.GEN_AI_REQUEST_TEMPERATURE, req.sampling.temperature)
    span.set_attribute(names.GEN_AI_REQUEST_TOP_P, req.sampling.top_p)
    span.set_attribute(names.GEN_AI_USAGE_INPUT_TOKENS, len(req.prompt_token_ids))
    span.set_attribute(names.REQUEST_ID, req.request_id)
    span.set_attribute(names.INTERNAL_REQUEST_ID, req.internal_id)


def _set_outcome_attributes(span: trace.Span, emitter: ResponseEmitter) -> None:
    span.set_attribute(names.GEN_AI_USAGE_OUTPUT_TOKENS, emitter.num_sent_tokens)
    span.set_attribute(names.CACHED_PROMPT_TOKENS, emitter.cached_prompt_tokens)
    if emitter.finish_reason is not None:
        # GenAI semconv values: "length", "stop" (the enum's values).
        span.set_attribute(names.GEN_AI_RESPONSE_FINISH_REASONS, [emitter.finish_reason.value])
