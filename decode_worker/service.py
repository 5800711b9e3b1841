"""The DecodeWorker gRPC servicer and the worker's start-up.

The servicer is thin: each method converts the request, calls one plain function
(`DecodeFlow.run`, the engine loop's residency count or stats) and converts the
answer back.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from dataclasses import dataclass

import grpc

from decode_worker.admission import DecodeAdmission, DecodeCall, PrefillHandoff
from decode_worker.block_publisher import BlockPublisher
from decode_worker.config import DecodeConfig
from decode_worker.decode_flow import DecodeFailed, DecodeFlow, TokenBatch
from decode_worker.engine import DecodeEngine
from decode_worker.engine_loop import EngineLoop
from decode_worker.scheduler import RequestTooLargeError
from kvstore import BlockSpec, KVStore, open_store
from model.prompt_limits import InvalidPrompt
from model.sources import model_identity
from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc
from rpc.cache_salt_proto import cache_salt_from_proto
from rpc.limits import Overloaded
from rpc.sampling_proto import finish_reason_to_proto, sampling_from_proto
from rpc.server import DEFAULT_DRAIN_TIMEOUT_S, DRAIN_STOP_GRACE_S, ServiceBinding
from rpc.store_stats import store_stats_to_proto, warn_if_unauthenticated
from rpc.worker_server import WorkerServer, serve_worker
from telemetry.metrics import ServiceMetrics, Snapshot
from telemetry.propagation import caller_context

log = logging.getLogger(__name__)


class DecodeServicer(wgrpc.DecodeWorkerServicer):
    def __init__(
        self,
        worker_id: str,
        flow: DecodeFlow,
        store: KVStore,
        metrics: ServiceMetrics,
        publisher: BlockPublisher | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.flow = flow
        self.store = store
        self.publisher = publisher
        metrics.report(self.snapshot)

    async def Decode(self, request: wpb.DecodeRequest, context: grpc.aio.ServicerContext):
        try:
            call = call_from_proto(request)
        except ValueError as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        try:
            async for batch in self.flow.run(call, caller_context(context)):
                yield _response_to_proto(batch)
        except InvalidPrompt as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except Overloaded as err:
            await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(err))
        except DecodeFailed as err:
            await context.abort(*_status_for(err.cause))

    async def CountResident(self, request: wpb.CountResidentRequest, context):
        return wpb.CountResidentResponse(
            num_resident_blocks=self.flow.loop.count_resident(list(request.block_hashes))
        )

    async def GetStats(self, request: wpb.StatsRequest, context):
        stats, counters = self.flow.loop.stats(), self.flow.counters
        return wpb.WorkerStats(
            worker_id=self.worker_id,
            role="decode",
            num_waiting=stats.num_waiting,
            num_running=stats.num_running,
            num_blocks=stats.num_blocks,
            num_used_blocks=stats.num_used_blocks,
            kv_cache_dtype=stats.kv_cache_dtype,
            kv_pool_tokens=stats.kv_pool_tokens,
            kv_pool_bytes=stats.kv_pool_bytes,
            num_computed_tokens_total=stats.num_computed_tokens_total,
            num_generated_tokens_total=stats.num_generated_tokens_total,
            num_finished_requests_total=stats.num_finished_requests_total,
            num_preemptions_total=stats.num_preemptions_total,
            store=store_stats_to_proto(self.store.stats()),
            num_resumed_requests_total=counters.num_resumed_requests_total,
            num_resumed_computed_tokens_total=counters.num_resumed_computed_tokens_total,
            num_published_blocks_total=(
                self.publisher.num_published_blocks if self.publisher is not None else 0
            ),
        )

    def snapshot(self) -> Snapshot:
        stats, store = self.flow.loop.stats(), self.store.stats()
        return Snapshot(
            num_requests_waiting=stats.num_waiting,
            num_requests_running=stats.num_running,
            kv_cache_usage_perc=stats.kv_usage,
            generation_tokens_total=stats.num_generated_tokens_total,
            num_preemptions_total=stats.num_preemptions_total,
            kv_store_hits_total=store.hits,
            kv_store_misses_total=store.misses,
            kv_store_corrupt_blocks_total=store.corrupt_blocks,
            kv_store_errors_total=store.errors,
            kv_transfer_bytes_in_total=store.bytes_in,
            kv_transfer_bytes_out_total=store.bytes_out,
        )


def call_from_proto(request: wpb.DecodeRequest) -> DecodeCall:
    """Raises ValueError (naming the field) for sampling the model refuses, a bad
    cache salt, or both `prefill` and `generated_token_ids`. Token ids are checked
    against the vocabulary by the admission."""
    prefill, generated = None, list(request.generated_token_ids)
    if request.HasField("prefill"):
        if generated:
            raise ValueError(
                "generated_token_ids must be empty with prefill (its first_token_id is the "
                "only output token so far); send one or the other"
            )
        prefill = PrefillHandoff(request.prefill.tail_id if request.prefill.has_tail else "")
        generated = [request.prefill.first_token_id]
    try:
        sampling = sampling_from_proto(request.sampling)
    except ValueError as err:
        raise ValueError(f"sampling.{err}") from None
    return DecodeCall(
        request_id=request.request_id,
        prompt_token_ids=list(request.prompt_token_ids),
        sampling=sampling,
        generated_token_ids=generated,
        prefill=prefill,
        cache_salt=cache_salt_from_proto(request),
    )


def _response_to_proto(batch: TokenBatch) -> wpb.DecodeResponse:
    return wpb.DecodeResponse(
        token_ids=batch.token_ids,
        logprobs=batch.logprobs,
        finish_reason=finish_reason_to_proto(batch.finish_reason),
        num_cached_tokens=batch.num_cached_tokens,
        num_resident_blocks=batch.num_resident_blocks,
        num_fetched_blocks=batch.num_fetched_blocks,
        num_reused_tokens=batch.num_reused_tokens,
    )


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
    flow: DecodeFlow
    store: KVStore
    publisher: BlockPublisher | None

    @property
    def loop(self) -> EngineLoop:
        return self.flow.loop

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
        """Takes no new requests and finishes those in flight (at most `timeout_s`);
        then stops, which cancels the rest: the router resumes them on another decode
        worker from the blocks this one published. Returns whether all finished."""
        finished = await self.hosted.drain(timeout_s, lambda: self.flow.counters.num_active == 0)
        if not finished and self.publisher is not None:
            # What the cut requests generated so far, for their resumes to fetch.
            await asyncio.to_thread(self.publisher.flush, DRAIN_STOP_GRACE_S)
        await self.stop(DRAIN_STOP_GRACE_S)
        return finished

    async def stop(self, grace_s: float = 2.0) -> None:
        await self.hosted.stop(grace_s)
        await asyncio.to_thread(self.loop.stop)
        if self.publisher is not None:
            await asyncio.to_thread(self.publisher.stop, grace_s)
        self.store.close()


async def start_decode_worker(config: DecodeConfig) -> DecodeWorker:
    loaded = await asyncio.to_thread(config.runtime.load)
    kv_cache_dtype = config.runtime.kv_cache_dtype
    spec = BlockSpec.for_model(
        model_identity(config.runtime.model),
        loaded.config,
        loaded.dtype,
        config.engine.block_size,
        kv_cache_dtype,
    )
    store = await asyncio.to_thread(
        functools.partial(open_store, config.store_url, spec, secret=config.store_secret)
    )
    warn_if_unauthenticated(store, config.store_url)
    publisher = BlockPublisher(store) if config.publish_computed_blocks else None
    engine = DecodeEngine(
        loaded,
        config.engine,
        spec.fingerprint,
        publisher.submit if publisher else None,
        kv_cache_dtype,
    )
    loop = EngineLoop(engine)
    loop.start()
    metrics = ServiceMetrics(config.runtime.model, "decode")
    admission = DecodeAdmission(loop, store, loaded.config, metrics)
    flow = DecodeFlow(loop, admission, metrics, config.limits.max_queued)
    servicer = DecodeServicer("", flow, store, metrics, publisher)
    hosted = await serve_worker(
        ServiceBinding(
            wgrpc.add_DecodeWorkerServicer_to_server, servicer, "kvrelay.v1.DecodeWorker"
        ),
        config.where,
        wpb.RegisterRequest(
            role=wpb.WORKER_ROLE_DECODE,
            model=config.runtime.model,
            kv_fingerprint=spec.fingerprint,
            kv_cache_dtype=kv_cache_dtype,
            block_size=spec.block_size,
            vocab_size=loaded.config.vocab_size,
            max_context_len=loaded.config.max_position_embeddings,
            max_local_prefill_len=config.max_local_prefill_len,
        ),
        lambda: _heartbeat(loop),
        metrics,
        is_stalled=lambda: loop.is_stalled(config.limits.engine_stall_timeout_s),
        store=store,
    )
    servicer.worker_id = hosted.worker_id
    log.info(
        "decode worker %s serving %s on %s",
        hosted.worker_id,
        config.runtime.model,
        hosted.advertise_address,
    )
    return DecodeWorker(hosted, flow, store, publisher)


def _heartbeat(loop: EngineLoop) -> wpb.HeartbeatRequest:
    stats = loop.stats()
    return wpb.HeartbeatRequest(
        num_waiting=stats.num_waiting, num_running=stats.num_running, kv_usage=stats.kv_usage
    )
