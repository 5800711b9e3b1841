"""The PrefillWorker gRPC servicer and the worker's start-up.

The servicer is thin: each method converts the request, calls one plain function
(`PrefillFlow.run`, the handoff's release, the engine's stats) and converts the
answer back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from kvstore import BlockSpec, KVStore, StoreUnavailableError, open_store
from model.prompt_limits import InvalidPrompt
from model.sources import model_identity
from prefill_worker.config import PrefillConfig
from prefill_worker.engine import PrefillCancelled, PrefillEngine
from prefill_worker.prefill_flow import PrefillFlow, PrefillOutcome
from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc
from rpc.cache_salt_proto import cache_salt_from_proto
from rpc.limits import Overloaded
from rpc.sampling_proto import finish_reason_to_proto, sampling_from_proto
from rpc.server import DEFAULT_DRAIN_TIMEOUT_S, DRAIN_STOP_GRACE_S, ServiceBinding
from rpc.store_stats import store_stats_to_proto, warn_if_unauthenticated
from rpc.worker_server import WorkerServer, serve_worker
from telemetry import names
from telemetry.metrics import ServiceMetrics, Snapshot
from telemetry.propagation import caller_context

log = logging.getLogger(__name__)
tracer = trace.get_tracer("kvrelay.prefill")


class PrefillServicer(wgrpc.PrefillWorkerServicer):
    def __init__(self, worker_id: str, flow: PrefillFlow, metrics: ServiceMetrics) -> None:
        self.worker_id = worker_id
        self.flow = flow
        metrics.report(self.snapshot)

    async def Prefill(self, request: wpb.PrefillRequest, context: grpc.aio.ServicerContext):
        with tracer.start_as_current_span(
            names.SPAN_PREFILL, context=caller_context(context), kind=trace.SpanKind.SERVER
        ) as span:
            span.set_attribute(names.REQUEST_ID, request.request_id)
            try:
                sampling = sampling_from_proto(request.sampling)
            except ValueError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"sampling.{err}")
            try:
                cache_salt = cache_salt_from_proto(request)
            except ValueError as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            try:
                outcome = await self.flow.run(
                    request.request_id, list(request.prompt_token_ids), sampling, cache_salt
                )
            except InvalidPrompt as err:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
            except Overloaded as err:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
            except PrefillCancelled:
                await context.abort(grpc.StatusCode.CANCELLED, "prefill cancelled")
        return wpb.PrefillResponse(worker_id=self.worker_id, result=_result_to_proto(outcome))

    async def Release(self, request: wpb.ReleaseRequest, context: grpc.aio.ServicerContext):
        self.flow.handoff.release(request.request_id)
        return wpb.ReleaseResponse()

    async def GetStats(self, request: wpb.StatsRequest, context: grpc.aio.ServicerContext):
        stats = self.flow.engine.stats()
        num_tails = await asyncio.to_thread(_num_tails_or_zero, self.flow.store)
        return wpb.WorkerStats(
            worker_id=self.worker_id,
            role="prefill",
            kv_cache_dtype=self.flow.engine.kv_format.name,
            num_waiting=stats.num_waiting,
            num_running=stats.num_running,
            num_computed_tokens_total=stats.num_computed_tokens_total,
            num_cached_tokens_total=stats.num_cached_tokens_total,
            num_finished_requests_total=stats.num_finished_requests_total,
            store=store_stats_to_proto(self.flow.store.stats()),
            num_live_tails=num_tails,
        )

    def snapshot(self) -> Snapshot:
        stats, store = self.flow.engine.stats(), self.flow.store.stats()
        return Snapshot(
            num_requests_waiting=stats.num_waiting,
            num_requests_running=stats.num_running,
            prompt_tokens_total=stats.num_computed_tokens_total,
            cached_prompt_tokens_total=stats.num_cached_tokens_total,
            kv_store_hits_total=store.hits,
            kv_store_misses_total=store.misses,
            kv_store_corrupt_blocks_total=store.corrupt_blocks,
            kv_store_errors_total=store.errors,
            kv_transfer_bytes_in_total=store.bytes_in,
            kv_transfer_bytes_out_total=store.bytes_out,
        )


def _result_to_proto(outcome: PrefillOutcome) -> wpb.PrefillResult:
    return wpb.PrefillResult(
        first_token_id=outcome.first_token_id,
        first_logprob=outcome.first_logprob,
        has_tail=outcome.has_tail,
        tail_id=outcome.tail_id if outcome.has_tail else "",
        num_cached_tokens=outcome.num_cached_tokens,
        num_computed_tokens=outcome.num_computed_tokens,
        finish_reason=finish_reason_to_proto(outcome.finish_reason),
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
    flow: PrefillFlow

    @property
    def worker_id(self) -> str:
        return self.hosted.worker_id

    @property
    def port(self) -> int:
        return self.hosted.port

    @property
    def metrics_port(self) -> int | None:
        return self.hosted.metrics_port

    async def drain(self, timeout_s: float = DEFAULT_DRAIN_TIMEOUT_S) -> bool:
        """Takes no new prompts and finishes those in flight (at most `timeout_s`);
        then stops. Returns whether every prefill finished before the stop."""
        finished = await self.hosted.drain(timeout_s, lambda: self.flow.num_active == 0)
        await self.stop(DRAIN_STOP_GRACE_S)
        return finished

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.hosted.stop(grace_s)
        await asyncio.to_thread(self.flow.engine.stop)
        # Puts of requests the shutdown cancelled, and their tails' deletion.
        await asyncio.to_thread(self.flow.handoff.wait_idle, grace_s)
        self.flow.store.close()


async def start_prefill_worker(config: PrefillConfig) -> PrefillWorker:
    loaded = await asyncio.to_thread(config.runtime.load)
    kv_cache_dtype = config.runtime.kv_cache_dtype
    spec = BlockSpec.for_model(
        model_identity(config.runtime.model),
        loaded.config,
        loaded.dtype,
        config.block_size,
        kv_cache_dtype,
    )
    store = await asyncio.to_thread(
        functools.partial(open_store, config.store_url, spec, secret=config.store_secret)
    )
    warn_if_unauthenticated(store, config.store_url)
    engine = PrefillEngine(loaded, config.token_budget, kv_cache_dtype)
    engine.start()
    metrics = ServiceMetrics(config.runtime.model, "prefill")
    flow = PrefillFlow(
        engine,
        store,
        loaded.config,
        metrics,
        enable_prefix_cache=config.enable_prefix_cache,
        max_queued=config.limits.max_queued,
    )
    servicer = PrefillServicer("", flow, metrics)
    hosted = await serve_worker(
        ServiceBinding(
            wgrpc.add_PrefillWorkerServicer_to_server, servicer, "kvrelay.v1.PrefillWorker"
        ),
        config.where,
        wpb.RegisterRequest(
            role=wpb.WORKER_ROLE_PREFILL,
            model=config.runtime.model,
            kv_fingerprint=spec.fingerprint,
            kv_cache_dtype=kv_cache_dtype,
            block_size=spec.block_size,
            vocab_size=loaded.config.vocab_size,
            max_context_len=loaded.config.max_position_embeddings,
        ),
        lambda: _heartbeat(engine),
        metrics,
        is_stalled=lambda: engine.is_stalled(config.limits.engine_stall_timeout_s),
        store=store,
    )
    servicer.worker_id = hosted.worker_id
    log.info(
        "prefill worker %s serving %s on %s",
        hosted.worker_id,
        config.runtime.model,
        hosted.advertise_address,
    )
    return PrefillWorker(hosted, flow)


def _heartbeat(engine: PrefillEngine) -> wpb.HeartbeatRequest:
    stats = engine.stats()
    return wpb.HeartbeatRequest(num_waiting=stats.num_waiting, num_running=stats.num_running)
