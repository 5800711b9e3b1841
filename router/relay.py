"""One request's trip through the cluster: prefill, decode, and the token relay.

`RequestRelay.generate` is the router's request path from DESIGN.md as plain
async code: tokenize and validate, pick a prefill worker, pick the decode worker
that holds most of the prompt's blocks, then detokenize and apply stop strings
while tokens stream back. Cancellation of the caller's task cancels whichever
worker call is in flight; a tail block no decode worker took is released.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
from opentelemetry import trace
from opentelemetry.context import Context

from kvstore.hashing import hash_token_blocks
from model.tokenizer import IncrementalDetokenizer, Tokenizer
from protos import generator_pb2 as pb
from protos import workers_pb2 as wpb
from router.cluster import Cluster, WorkerHandle
from router.registry import Role
from router.responses import ResponseEmitter
from router.validation import (
    InvalidRequest,
    ModelLimits,
    RequestLimits,
    validate_prompt_shape,
    validate_prompt_tokens,
    validate_sampling,
)
from telemetry import names
from telemetry.metrics import ServiceMetrics, Snapshot
from telemetry.propagation import outgoing_metadata

tracer = trace.get_tracer("kvrelay.router")

# How long the router waits for CountResident answers before routing without them.
RESIDENCY_TIMEOUT_S = 0.5


class RelayError(Exception):
    """A request that failed with a gRPC status the client should see."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class PreparedRequest:
    """A validated request, tokenized, with its block hashes."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: pb.SamplingParams
    block_hashes: list[bytes]


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
    """Runs requests across the cluster's workers."""

    def __init__(
        self,
        cluster: Cluster,
        tokenizer: Tokenizer | None,
        limits: RequestLimits,
        max_inflight: int,
        metrics: ServiceMetrics,
    ) -> None:
        self.cluster = cluster
        self.tokenizer = tokenizer
        self.limits = limits
        self.max_inflight = max_inflight
        self.stats = RelayStats()
        self.metrics = metrics
        metrics.report(self.stats.snapshot)
        self._background: set[asyncio.Task] = set()

    def prepare(self, request: pb.GenerateRequest) -> PreparedRequest:
        """Validates and tokenizes; raises InvalidRequest or RelayError."""
        validate_prompt_shape(request, self.limits)
        sampling = validate_sampling(request.sampling, self.limits)
        model = self.cluster.model
        if model is None or not self.cluster.handles(Role.DECODE):
            raise RelayError(
                grpc.StatusCode.UNAVAILABLE,
                "no decode worker is registered yet; start one (`kvrelay serve decode`) and retry",
            )
        if request.prompt_token_ids:
            token_ids, field = list(request.prompt_token_ids), "prompt_token_ids"
        else:
            if self.tokenizer is None:
                raise InvalidRequest(
                    "this model has no tokenizer.json: send prompt_token_ids instead of prompt"
                )
            token_ids, field = self.tokenizer.encode(request.prompt), "prompt"
        if sampling.stop and self.tokenizer is None:
            raise InvalidRequest(
                "sampling.stop needs text, and this model has no tokenizer.json: use stop_token_ids"
            )
        validate_prompt_tokens(
            token_ids,
            sampling.max_tokens,
            ModelLimits(model.vocab_size, model.max_context_len),
            field,
        )
        return PreparedRequest(
            request_id=request.request_id or uuid.uuid4().hex,
            prompt_token_ids=token_ids,
            sampling=sampling,
            block_hashes=hash_token_blocks(token_ids, model.block_size, model.kv_fingerprint),
        )

    async def generate(
        self,
        request: pb.GenerateRequest,
        time_remaining: float | None,
        parent: Context | None = None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The whole request; raises InvalidRequest or RelayError before the first
        message, RelayError after it."""
        arrival = time.monotonic()
        deadline = None if time_remaining is None else arrival + time_remaining
        # Started, not made current: this is an async generator (see outgoing_metadata).
        span = tracer.start_span(names.SPAN_GENERATE, context=parent, kind=trace.SpanKind.SERVER)
        try:
            if self.stats.num_inflight >= self.max_inflight:
                self.stats.num_rejected += 1
                raise RelayError(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"the router is serving {self.max_inflight} requests, its limit; retry later",
                )
            prepared = self.prepare(request)
            _set_request_attributes(span, self.cluster.model_name, prepared)
            self.stats.num_inflight += 1
            self.stats.num_prompt_tokens_total += len(prepared.prompt_token_ids)
            last_token_at = None
            try:
                async for response in self._run(prepared, deadline, span):
                    if response.token_ids:
                        now = time.monotonic()
                        if last_token_at is None:
                            self.metrics.time_to_first_token.observe(now - arrival)
                        else:
                            # A message may carry several tokens (a slow reader's
                            # backlog): each gets its share of the gap.
                            gap = (now - last_token_at) / len(response.token_ids)
                            for _ in response.token_ids:
                                self.metrics.inter_token_latency.observe(gap)
                        last_token_at = now
                        self.stats.num_generated_tokens_total += len(response.token_ids)
                    if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                        self.stats.num_cached_prompt_tokens_total += (
                            response.usage.cached_prompt_tokens
                        )
                        self.metrics.e2e_request_latency.observe(time.monotonic() - arrival)
                    yield response
            finally:
                self.stats.num_inflight -= 1
                self.stats.num_finished += 1
        except (InvalidRequest, RelayError) as err:
            span.set_status(trace.StatusCode.ERROR, str(err))
            raise
        finally:
            span.end()

    async def _run(
        self, req: PreparedRequest, deadline: float | None, span: trace.Span
    ) -> AsyncIterator[pb.GenerateResponse]:
        detokenizer = IncrementalDetokenizer(self.tokenizer) if self.tokenizer else None
        emitter = ResponseEmitter(
            req.request_id, req.sampling, len(req.prompt_token_ids), detokenizer
        )
        prefill: wpb.PrefillResult | None = None
        prefill_worker: WorkerHandle | None = None
        tail_taken = False
        try:
            if self._needs_prefill(req):
                prefill_worker, prefill = await self._prefill(req, deadline, span)
                span.set_attribute(names.PREFILL_WORKER, prefill_worker.entry.worker_id)
                emitter.cached_prompt_tokens = prefill.num_cached_tokens
                message = emitter.add([prefill.first_token_id], [prefill.first_logprob])
                if prefill.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    yield emitter.finish(message, prefill.finish_reason)
                    return
                if message is not None:
                    if emitter.is_stopped:
                        yield emitter.finish(message, pb.FINISH_REASON_STOP)
                        return
                    yield message
            decode_worker = await self._pick_decode(req)
            span.set_attribute(names.DECODE_WORKER, decode_worker.entry.worker_id)
            async for update in self._decode(decode_worker, req, prefill, deadline, span):
                tail_taken = True
                if update.num_cached_tokens:
                    emitter.cached_prompt_tokens = update.num_cached_tokens
                message = emitter.add(list(update.token_ids), list(update.logprobs))
                if emitter.is_stopped:
                    # Leaving the loop cancels the decode stream, which frees its blocks.
                    yield emitter.finish(message, pb.FINISH_REASON_STOP)
                    return
                if update.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
                    yield emitter.finish(message, update.finish_reason)
                    return
                if message is not None:
                    yield message
            raise RelayError(grpc.StatusCode.INTERNAL, "decode worker ended the stream early")
        finally:
            span.set_attribute(names.GEN_AI_USAGE_OUTPUT_TOKENS, emitter.num_sent_tokens)
            span.set_attribute(names.CACHED_PROMPT_TOKENS, emitter.cached_prompt_tokens)
            if emitter.finish_reason is not None:
                span.set_attribute(
                    names.GEN_AI_RESPONSE_FINISH_REASONS,
                    # GenAI semconv values: "length", "stop", ... (not the enum's name).
                    [
                        pb.FinishReason.Name(emitter.finish_reason)
                        .removeprefix("FINISH_REASON_")
                        .lower()
                    ],
                )
            if prefill is not None and prefill.has_tail and not tail_taken:
                self._release_tail(prefill_worker, req.request_id)

    def _needs_prefill(self, req: PreparedRequest) -> bool:
        if not self.cluster.handles(Role.PREFILL):
            return False
        local_max = max(h.max_local_prefill_len for h in self.cluster.handles(Role.DECODE))
        return len(req.prompt_token_ids) > local_max

    async def _prefill(
        self, req: PreparedRequest, deadline: float | None, parent: trace.Span
    ) -> tuple[WorkerHandle, wpb.PrefillResult]:
        tried: set[str] = set()
        while True:
            candidates = [
                h for h in self.cluster.handles(Role.PREFILL) if h.entry.worker_id not in tried
            ]
            if not candidates:
                raise RelayError(
                    grpc.StatusCode.UNAVAILABLE, "no prefill worker could serve the request"
                )
            entry = self.cluster.policy.pick_prefill(
                [h.entry for h in candidates], req.block_hashes
            )
            handle = self.cluster.handle(entry.worker_id)
            tried.add(entry.worker_id)
            entry.num_inflight += 1
            try:
                with tracer.start_as_current_span(
                    names.SPAN_PREFILL_CALL,
                    context=trace.set_span_in_context(parent),
                    kind=trace.SpanKind.CLIENT,
                ):
                    response = await handle.stub.Prefill(
                        wpb.PrefillRequest(
                            request_id=req.request_id,
                            prompt_token_ids=req.prompt_token_ids,
                            sampling=req.sampling,
                        ),
                        timeout=_remaining(deadline),
                        metadata=outgoing_metadata(),
                    )
            except grpc.aio.AioRpcError as err:
                if err.code() == grpc.StatusCode.UNAVAILABLE:
                    continue  # the worker is gone: fail over to another one
                if err.code() in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
                    # Both can come after the worker put the tail: release it.
                    self._release_tail(handle, req.request_id)
                raise RelayError(err.code(), f"prefill failed: {err.details()}") from err
            except asyncio.CancelledError:
                # The worker may have put the tail before the cancel reached it (its
                # answer in flight): no decode worker will take it now.
                self._release_tail(handle, req.request_id)
                raise
            finally:
                entry.num_inflight -= 1
            self.cluster.policy.on_prefilled(entry, req.block_hashes)
            return handle, response.result

    async def _pick_decode(self, req: PreparedRequest) -> WorkerHandle:
        handles = self.cluster.handles(Role.DECODE)
        if not handles:
            raise RelayError(grpc.StatusCode.UNAVAILABLE, "no decode worker is registered")
        num_resident: dict[str, int] = {}
        if req.block_hashes and len(handles) > 1:
            ask = wpb.CountResidentRequest(block_hashes=req.block_hashes)
            answers = await asyncio.gather(
                *(h.stub.CountResident(ask, timeout=RESIDENCY_TIMEOUT_S) for h in handles),
                return_exceptions=True,
            )
            for handle, answer in zip(handles, answers, strict=True):
                if isinstance(answer, wpb.CountResidentResponse):
                    num_resident[handle.entry.worker_id] = answer.num_resident_blocks
        entry = self.cluster.policy.pick_decode([h.entry for h in handles], num_resident)
        return self.cluster.handle(entry.worker_id)

    async def _decode(
        self,
        handle: WorkerHandle,
        req: PreparedRequest,
        prefill: wpb.PrefillResult | None,
        deadline: float | None,
        parent: trace.Span,
    ) -> AsyncIterator[wpb.DecodeResponse]:
        handle.entry.num_inflight += 1
        span = tracer.start_span(
            names.SPAN_DECODE_CALL,
            context=trace.set_span_in_context(parent),
            kind=trace.SpanKind.CLIENT,
        )
        call = None
        try:
            call = handle.stub.Decode(
                wpb.DecodeRequest(
                    request_id=req.request_id,
                    prompt_token_ids=req.prompt_token_ids,
                    sampling=req.sampling,
                    prefill=prefill,
                ),
                timeout=_remaining(deadline),
                metadata=outgoing_metadata(trace.set_span_in_context(span)),
            )
            async for update in call:
                yield update
        except grpc.aio.AioRpcError as err:
            span.set_status(trace.StatusCode.ERROR, err.details() or "")
            raise RelayError(err.code(), f"decode failed: {err.details()}") from err
        finally:
            handle.entry.num_inflight -= 1
            if call is not None and not call.done():
                call.cancel()
            span.end()

    def _release_tail(self, handle: WorkerHandle | None, request_id: str) -> None:
        """Deletes a tail no decode worker took. Runs as its own task because the
        caller may be a cancelled request, whose own awaits would be cancelled."""
        if handle is None:
            return

        async def release() -> None:
            # On failure the tail's TTL in the store is the backstop.
            with contextlib.suppress(grpc.aio.AioRpcError):
                await handle.stub.Release(wpb.ReleaseRequest(request_id=request_id), timeout=5)

        task = asyncio.ensure_future(release())
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise RelayError(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
    return remaining


def _set_request_attributes(span: trace.Span, model: str, req: PreparedRequest) -> None:
    span.set_attribute(names.GEN_AI_OPERATION_NAME, "text_completion")
    span.set_attribute(names.GEN_AI_REQUEST_MODEL, model)
    span.set_attribute(names.GEN_AI_REQUEST_MAX_TOKENS, req.sampling.max_tokens)
    span.set_attribute(names.GEN_AI_REQUEST_TEMPERATURE, req.sampling.temperature)
    span.set_attribute(names.GEN_AI_REQUEST_TOP_P, req.sampling.top_p)
    span.set_attribute(names.GEN_AI_USAGE_INPUT_TOKENS, len(req.prompt_token_ids))
    span.set_attribute(names.REQUEST_ID, req.request_id)


__all__ = ["InvalidRequest", "PreparedRequest", "RelayError", "RequestRelay"]
