"""The DecodeWorker gRPC servicer and the worker's start-up.

The servicer is thin: it fetches the request's missing blocks from the store
beside the engine loop, submits the request, and relays each sampled token.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import torch
from opentelemetry import trace
from opentelemetry.context import Context

from decode_worker.config import DecodeConfig
from decode_worker.engine import DecodeEngine, EngineRequest, TokenOutput
from decode_worker.engine_loop import EngineLoop
from decode_worker.kv_fetch import fetch_prompt_kv
from decode_worker.scheduler import RequestTooLargeError
from kvstore import BlockSpec, KVStore, open_store
from model.loader import LoadedModel, available_cores, load_model, parse_dtype
from protos import generator_pb2 as pb
from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc
from rpc.sampling_proto import finish_reason_to_proto, sampling_from_proto
from rpc.server import ServiceBinding
from rpc.store_stats import store_stats_to_proto
from rpc.worker_server import WorkerServer, serve_worker
from telemetry import names
from telemetry.metrics import ServiceMetrics, Snapshot
from telemetry.propagation import caller_context

log = logging.getLogger(__name__)
tracer = trace.get_tracer("kvrelay.decode")


class DecodeServicer(wgrpc.DecodeWorkerServicer):
    def __init__(
        self,
        worker_id: str,
        loaded: LoadedModel,
        loop: EngineLoop,
        store: KVStore,
        metrics: ServiceMetrics,
    ):
        self.worker_id = worker_id
        self.loaded = loaded
        self.loop = loop
        self.store = store
        self.metrics = metrics
        metrics.report(self.snapshot)

    async def Decode(self, request: wpb.DecodeRequest, context: grpc.aio.ServicerContext):
        # Spans are started, not made current: this is an async generator, and a
        # context attached across a `yield` cannot be detached reliably.
        span = tracer.start_span(
            names.SPAN_DECODE, context=caller_context(context), kind=trace.SpanKind.SERVER
        )
        span.set_attribute(names.REQUEST_ID, request.request_id)
        arrival = time.monotonic()
        generation_span = None
        is_finished, num_tokens, last_token_at = False, 0, None
        try:
            try:
                engine_request, num_resident = await self._engine_request(
                    request, trace.set_span_in_context(span)
                )
            except ValueError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            outputs: asyncio.Queue[TokenOutput | BaseException] = asyncio.Queue()
            event_loop = asyncio.get_running_loop()
            submitted_ns = time.time_ns()
            self.loop.submit(
                engine_request,
                lambda item: event_loop.call_soon_threadsafe(outputs.put_nowait, item),
            )
            generation_span = tracer.start_span(
                names.SPAN_DECODE_GENERATION, context=trace.set_span_in_context(span)
            )
            is_first = True
            while not is_finished:
                batch = [await outputs.get()]
                while not outputs.empty():  # coalesce when the client reads slower
                    batch.append(outputs.get_nowait())
                error = next((b for b in batch if isinstance(b, BaseException)), None)
                if error is not None:
                    is_finished = True
                    await context.abort(*_status_for(error))
                message = _decode_response(batch)
                num_tokens += len(message.token_ids)
                last_token_at = self._observe_tokens(arrival, last_token_at, len(batch))
                is_finished = message.finish_reason != pb.FINISH_REASON_UNSPECIFIED
                if is_first:
                    _record_queue_span(span, submitted_ns, batch[0].admitted_ns)
                    generation_span.set_attribute(
                        names.TIME_TO_FIRST_TOKEN_S, time.monotonic() - arrival
                    )
                    message.num_resident_blocks = num_resident
                    message.num_fetched_blocks = len(engine_request.provided_kv)
                    is_first = False
                yield message
        finally:
            if not is_finished:  # cancelled, deadline passed, or the client left
                self.loop.abort(request.request_id)
            if generation_span is not None:
                generation_span.set_attribute(names.NUM_GENERATED_TOKENS, num_tokens)
                generation_span.end()
            if is_finished:
                self.metrics.e2e_request_latency.observe(time.monotonic() - arrival)
            span.end()

    def _observe_tokens(
        self, arrival: float, last_token_at: float | None, num_tokens: int
    ) -> float:
        now = time.monotonic()
        if last_token_at is None:
            self.metrics.time_to_first_token.observe(now - arrival)
        else:
            for _ in range(num_tokens):
                self.metrics.inter_token_latency.observe((now - last_token_at) / num_tokens)
        return now

    def snapshot(self) -> Snapshot:
        engine, store = self.loop.engine, self.store.stats()
        return Snapshot(
            num_requests_waiting=self.loop.num_waiting,
            num_requests_running=self.loop.num_running,
            kv_cache_usage_perc=engine.pool.usage(),
            generation_tokens_total=engine.counters.num_generated_tokens_total,
            num_preemptions_total=engine.counters.num_preemptions_total,
            kv_store_hits_total=store.hits,
            kv_store_misses_total=store.misses,
            kv_store_corrupt_blocks_total=store.corrupt_blocks,
            kv_store_errors_total=store.errors,
            kv_transfer_bytes_in_total=store.bytes_in,
            kv_transfer_bytes_out_total=store.bytes_out,
        )

    async def _engine_request(
        self, request: wpb.DecodeRequest, parent: Context
    ) -> tuple[EngineRequest, int]:
        """Validates, and fetches what the pool lacks of a prefilled prompt."""
        sampling = sampling_from_proto(request.sampling)
        token_ids = list(request.prompt_token_ids)
        config = self.loaded.config
        if not token_ids:
            raise ValueError("prompt_token_ids is empty")
        if max(token_ids) >= config.vocab_size:
            raise ValueError(
                f"prompt_token_ids must be below the vocabulary size {config.vocab_size}"
            )
        if len(token_ids) + sampling.max_tokens > config.max_position_embeddings:
            raise ValueError(
                f"prompt ({len(token_ids)} tokens) plus max_tokens ({sampling.max_tokens}) "
                f"exceeds the model's context of {config.max_position_embeddings}"
            )
        if not request.HasField("prefill"):
            return EngineRequest(request.request_id, token_ids, sampling), 0
        prefill = request.prefill
        hashes = list(prefill.block_hashes)
        with tracer.start_as_current_span(names.SPAN_DECODE_ADMISSION, context=parent) as span:
            num_resident = self.loop.count_resident(hashes)
            with tracer.start_as_current_span(names.SPAN_STORE_GET) as get_span:
                started = time.perf_counter()
                provided = await asyncio.to_thread(
                    fetch_prompt_kv,
                    self.store,
                    hashes[num_resident:],
                    request.request_id,
                    prefill.has_tail,
                )
                self.metrics.kv_transfer_time.observe(time.perf_counter() - started)
                get_span.set_attribute(names.NUM_BLOCKS, len(provided))
                get_span.set_attribute(names.NUM_BYTES, sum(t.nbytes for t in provided))
            span.set_attribute(names.NUM_RESIDENT_BLOCKS, num_resident)
            span.set_attribute(names.NUM_FETCHED_BLOCKS, len(provided))
        return (
            EngineRequest(
                request.request_id,
                token_ids,
                sampling,
                first_token=(prefill.first_token_id, prefill.first_logprob),
                provided_kv=[t.to(self.loaded.device, self.loaded.dtype) for t in provided],
                provided_start_block=num_resident,
            ),
            num_resident,
        )

    async def CountResident(self, request: wpb.CountResidentRequest, context):
        return wpb.CountResidentResponse(
            num_resident_blocks=self.loop.count_resident(list(request.block_hashes))
        )

    async def GetStats(self, request: wpb.StatsRequest, context):
        engine = self.loop.engine
        counters = engine.counters
        return wpb.WorkerStats(
            worker_id=self.worker_id,
            role="decode",
            num_waiting=self.loop.num_waiting,
            num_running=self.loop.num_running,
            num_blocks=engine.pool.num_blocks,
            num_used_blocks=engine.pool.num_used_blocks,
            num_computed_tokens_total=counters.num_computed_tokens_total,
            num_generated_tokens_total=counters.num_generated_tokens_total,
            num_finished_requests_total=counters.num_finished_requests_total,
            num_preemptions_total=counters.num_preemptions_total,
            store=store_stats_to_proto(self.store.stats()),
        )


def _decode_response(batch: list[TokenOutput]) -> wpb.DecodeResponse:
    last = batch[-1]
    return wpb.DecodeResponse(
        token_ids=[out.token_id for out in batch],
        logprobs=[out.logprob for out in batch],
        finish_reason=finish_reason_to_proto(last.finish_reason),
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


def _status_for(error: BaseException) -> tuple[grpc.StatusCode, str]:
    if isinstance(error, RequestTooLargeError):
        return grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
    if isinstance(error, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT, str(error)
    return grpc.StatusCode.INTERNAL, f"decode failed: {error}"


@dataclass
class DecodeWorker:
    """A running decode worker."""

    hosted: WorkerServer
    loop: EngineLoop
    store: KVStore

    @property
    def worker_id(self) -> str:
        return self.hosted.worker_id

    @property
    def port(self) -> int:
        return self.hosted.port

    @property
    def metrics_port(self) -> int | None:
        return self.hosted.metrics_port

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.hosted.stop(grace_s)
        await asyncio.to_thread(self.loop.stop)
        self.store.close()


async def start_decode_worker(config: DecodeConfig) -> DecodeWorker:
    torch.set_num_threads(config.num_threads or available_cores())
    loaded = await asyncio.to_thread(
        load_model, config.model, dtype=parse_dtype(config.dtype), device=config.device
    )
    spec = BlockSpec.for_model(config.model, loaded.config, loaded.dtype, config.engine.block_size)
    store = await asyncio.to_thread(open_store, config.store_url, spec)
    loop = EngineLoop(DecodeEngine(loaded, config.engine, spec.fingerprint))
    loop.start()
    metrics = ServiceMetrics(config.model, "decode")
    servicer = DecodeServicer("", loaded, loop, store, metrics)
    hosted = await serve_worker(
        ServiceBinding(
            wgrpc.add_DecodeWorkerServicer_to_server, servicer, "kvrelay.v1.DecodeWorker"
        ),
        config.where,
        wpb.RegisterRequest(
            role=wpb.WORKER_ROLE_DECODE,
            model=config.model,
            kv_fingerprint=spec.fingerprint,
            block_size=spec.block_size,
            vocab_size=loaded.config.vocab_size,
            max_context_len=loaded.config.max_position_embeddings,
            max_local_prefill_len=config.max_local_prefill_len,
        ),
        lambda: wpb.HeartbeatRequest(
            num_waiting=loop.num_waiting,
            num_running=loop.num_running,
            kv_usage=loop.engine.pool.usage(),
        ),
        metrics,
    )
    servicer.worker_id = hosted.worker_id
    log.info(
        "decode worker %s serving %s on %s",
        hosted.worker_id,
        config.model,
        hosted.advertise_address,
    )
    return DecodeWorker(hosted, loop, store)
