"""The PrefillWorker gRPC servicer and the worker's start-up.

The servicer is thin: it loads the cached prefix from the store, hands the job to
the engine thread, and publishes the new blocks and the tail, with the store's
blocking calls off the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import grpc
import torch
from opentelemetry import trace

from kvstore import BlockSpec, KVStore, StoreUnavailableError, hash_token_blocks, open_store
from model.loader import LoadedModel, available_cores, load_model, parse_dtype
from model.sampling import finish_reason
from prefill_worker.config import PrefillConfig
from prefill_worker.engine import PrefillCancelled, PrefillEngine, PrefillJob
from prefill_worker.handoff import TailHandoff
from prefill_worker.inflight_prefixes import InflightPrefixes
from prefill_worker.store_io import load_cached_prefix
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
tracer = trace.get_tracer("kvrelay.prefill")


class PrefillServicer(wgrpc.PrefillWorkerServicer):
    def __init__(
        self,
        worker_id: str,
        loaded: LoadedModel,
        engine: PrefillEngine,
        store: KVStore,
        metrics: ServiceMetrics,
        enable_prefix_cache: bool = True,
    ):
        self.worker_id = worker_id
        self.loaded = loaded
        self.engine = engine
        self.enable_prefix_cache = enable_prefix_cache
        self.inflight = InflightPrefixes()
        self.store = store
        self.handoff = TailHandoff(store)
        self.block_size = store.spec.block_size
        self.metrics = metrics
        metrics.report(self.snapshot)

    async def Prefill(self, request: wpb.PrefillRequest, context: grpc.aio.ServicerContext):
        with tracer.start_as_current_span(
            names.SPAN_PREFILL, context=caller_context(context), kind=trace.SpanKind.SERVER
        ) as span:
            span.set_attribute(names.REQUEST_ID, request.request_id)
            token_ids = list(request.prompt_token_ids)
            try:
                sampling = sampling_from_proto(request.sampling)
                self._check_prompt(token_ids)
            except ValueError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            hashes = hash_token_blocks(token_ids, self.block_size, self.store.spec.fingerprint)
            # Requests sharing a prefix wait for the one computing it (only when they
            # can reuse it: with the cache off every request computes its own).
            shared = hashes if self.enable_prefix_cache else []
            async with self.inflight.claim(shared) as claim:
                job = self.engine.new_job(request.request_id, token_ids, sampling)
                with tracer.start_as_current_span(names.SPAN_STORE_LOOKUP) as lookup_span:
                    started = time.perf_counter()
                    num_present, job.num_cached_tokens = 0, 0
                    if self.enable_prefix_cache:
                        num_present, job.num_cached_tokens = await asyncio.to_thread(
                            load_cached_prefix, self.store, hashes, job.kv
                        )
                    if job.num_cached_tokens:
                        self.metrics.kv_transfer_time.observe(time.perf_counter() - started)
                    lookup_span.set_attribute(names.NUM_BLOCKS, len(hashes))
                    lookup_span.set_attribute(names.NUM_HITS, num_present)
                    lookup_span.set_attribute(names.CACHED_PROMPT_TOKENS, job.num_cached_tokens)
                # Blocks the store had need no waiting for; the rest wait for publishing.
                claim.release_leading(num_present)
                submitted_ns = time.time_ns()
                try:
                    output = await asyncio.wrap_future(self.engine.submit(job))
                except asyncio.CancelledError:
                    self.engine.cancel(job)
                    raise
                except PrefillCancelled:
                    await context.abort(grpc.StatusCode.CANCELLED, "prefill cancelled")
                self._record_engine_spans(job, submitted_ns, len(token_ids))
                finished = finish_reason(
                    output.first_token_id, 1, sampling, self.loaded.config.eos_token_ids
                )
                with tracer.start_as_current_span(names.SPAN_STORE_PUT) as put_span:
                    put_span.set_attribute(names.NUM_BLOCKS, len(hashes) - num_present)
                    started = time.perf_counter()
                    try:
                        await self.handoff.publish(
                            request.request_id,
                            hashes,
                            output.kv,
                            first_block=num_present,
                            with_tail=finished is None,
                        )
                    except StoreUnavailableError as err:
                        await context.abort(
                            grpc.StatusCode.UNAVAILABLE,
                            f"KV store unreachable, cannot hand off KV: {err}",
                        )
                    self.metrics.kv_transfer_time.observe(time.perf_counter() - started)
            return wpb.PrefillResponse(
                worker_id=self.worker_id,
                result=wpb.PrefillResult(
                    first_token_id=output.first_token_id,
                    first_logprob=output.first_logprob,
                    block_hashes=hashes,
                    has_tail=finished is None and len(token_ids) % self.block_size != 0,
                    num_cached_tokens=job.num_cached_tokens,
                    num_computed_tokens=len(token_ids) - job.num_cached_tokens,
                    finish_reason=finish_reason_to_proto(finished),
                ),
            )

    def _record_engine_spans(self, job: PrefillJob, submitted_ns: int, prompt_len: int) -> None:
        """The engine thread timed the job; its queueing and forward spans are
        recorded here, with those times, as children of the current span."""
        queue_span = tracer.start_span(names.SPAN_PREFILL_QUEUE, start_time=submitted_ns)
        queue_span.end(end_time=job.started_ns)
        forward_span = tracer.start_span(names.SPAN_PREFILL_FORWARD, start_time=job.started_ns)
        forward_span.set_attribute(names.CACHED_PROMPT_TOKENS, job.num_cached_tokens)
        forward_span.set_attribute(names.COMPUTED_PROMPT_TOKENS, prompt_len - job.num_cached_tokens)
        forward_span.end(end_time=job.finished_ns)
        self.metrics.queue_time.observe((job.started_ns - submitted_ns) / 1e9)

    def snapshot(self) -> Snapshot:
        counters, store = self.engine.counters, self.store.stats()
        return Snapshot(
            num_requests_waiting=self.engine.num_waiting,
            num_requests_running=self.engine.num_running,
            prompt_tokens_total=counters.num_computed_tokens_total,
            cached_prompt_tokens_total=counters.num_cached_tokens_total,
            kv_store_hits_total=store.hits,
            kv_store_misses_total=store.misses,
            kv_store_corrupt_blocks_total=store.corrupt_blocks,
            kv_store_errors_total=store.errors,
            kv_transfer_bytes_in_total=store.bytes_in,
            kv_transfer_bytes_out_total=store.bytes_out,
        )

    def _check_prompt(self, token_ids: list[int]) -> None:
        config = self.loaded.config
        if not token_ids:
            raise ValueError("prompt_token_ids is empty")
        if max(token_ids) >= config.vocab_size:
            raise ValueError(
                f"prompt_token_ids must be below the vocabulary size {config.vocab_size}"
            )
        if len(token_ids) >= config.max_position_embeddings:
            raise ValueError(
                f"prompt has {len(token_ids)} tokens; the model's context is {config.max_position_embeddings}"
            )

    async def Release(self, request: wpb.ReleaseRequest, context: grpc.aio.ServicerContext):
        try:
            await asyncio.to_thread(self.store.delete_tail, request.request_id)
        except StoreUnavailableError as err:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"KV store unreachable: {err}")
        return wpb.ReleaseResponse()

    async def GetStats(self, request: wpb.StatsRequest, context: grpc.aio.ServicerContext):
        counters = self.engine.counters
        num_tails = await asyncio.to_thread(_num_tails_or_zero, self.store)
        return wpb.WorkerStats(
            worker_id=self.worker_id,
            role="prefill",
            num_waiting=self.engine.num_waiting,
            num_running=self.engine.num_running,
            num_computed_tokens_total=counters.num_computed_tokens_total,
            num_cached_tokens_total=counters.num_cached_tokens_total,
            num_finished_requests_total=counters.num_finished_requests_total,
            store=store_stats_to_proto(self.store.stats()),
            num_live_tails=num_tails,
        )


def _num_tails_or_zero(store: KVStore) -> int:
    try:
        return store.num_tails()
    except StoreUnavailableError:
        return 0


@dataclass
class PrefillWorker:
    """A running prefill worker."""

    hosted: WorkerServer
    engine: PrefillEngine
    store: KVStore
    handoff: TailHandoff

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
        await asyncio.to_thread(self.engine.stop)
        # Puts of requests the shutdown cancelled, and their tails' deletion.
        await asyncio.to_thread(self.handoff.wait_idle, grace_s)
        self.store.close()


async def start_prefill_worker(config: PrefillConfig) -> PrefillWorker:
    torch.set_num_threads(config.num_threads or available_cores())
    loaded = await asyncio.to_thread(
        load_model, config.model, dtype=parse_dtype(config.dtype), device=config.device
    )
    spec = BlockSpec.for_model(config.model, loaded.config, loaded.dtype, config.block_size)
    store = await asyncio.to_thread(open_store, config.store_url, spec)
    engine = PrefillEngine(loaded, config.token_budget)
    engine.start()
    metrics = ServiceMetrics(config.model, "prefill")
    servicer = PrefillServicer("", loaded, engine, store, metrics, config.enable_prefix_cache)
    hosted = await serve_worker(
        ServiceBinding(
            wgrpc.add_PrefillWorkerServicer_to_server, servicer, "kvrelay.v1.PrefillWorker"
        ),
        config.where,
        wpb.RegisterRequest(
            role=wpb.WORKER_ROLE_PREFILL,
            model=config.model,
            kv_fingerprint=spec.fingerprint,
            block_size=spec.block_size,
            vocab_size=loaded.config.vocab_size,
            max_context_len=loaded.config.max_position_embeddings,
        ),
        lambda: wpb.HeartbeatRequest(
            num_waiting=engine.num_waiting, num_running=engine.num_running
        ),
        metrics,
    )
    servicer.worker_id = hosted.worker_id
    log.info(
        "prefill worker %s serving %s on %s",
        hosted.worker_id,
        config.model,
        hosted.advertise_address,
    )
    return PrefillWorker(hosted, engine, store, servicer.handoff)
