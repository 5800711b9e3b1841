"""The router's gRPC servicers (Generator, Registry) and its serve loop.

Servicers are thin: they convert statuses and call `RequestRelay` / `Cluster`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import grpc
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from model.tokenizer import Tokenizer
from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc
from router.chat_prompt import ChatPrompts
from router.cluster import Cluster, RegistrationRefused
from router.http_api import HttpServer, build_app
from router.registry import Role
from router.relay import RequestRelay
from router.relay_error import RelayError
from router.routing import PrefixLoadPolicy
from router.validation import InvalidRequest, RequestLimits
from router.worker_calls import FailoverConfig
from router.worker_client import GrpcWorkerClient
from rpc.server import DRAIN_POLL_S, DRAIN_STOP_GRACE_S, RunningServer, ServiceBinding, start_server
from telemetry.metrics import ServiceMetrics, serve_metrics
from telemetry.propagation import caller_context

log = logging.getLogger(__name__)

_ROLE_PB = {Role.PREFILL: wpb.WORKER_ROLE_PREFILL, Role.DECODE: wpb.WORKER_ROLE_DECODE}


@dataclass(frozen=True)
class RouterConfig:
    """How a router runs."""

    model: str
    """Model name or directory; workers must register with the same."""
    address: str = "0.0.0.0:50051"
    """host:port to serve Generator and Registry on."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    """What requests may ask for."""
    max_inflight: int = 256
    """Requests served at once; past it, RESOURCE_EXHAUSTED."""
    worker_expiry_s: float = 6.0
    """A worker silent for this long is dropped; it heartbeats every third of it."""
    metrics_port: int | None = None
    """Port for Prometheus `/metrics`; None turns it off, 0 picks a free one."""
    failover: FailoverConfig = field(default_factory=FailoverConfig)
    """Request and token timeouts, and how often a request may move between workers."""
    http_port: int | None = None
    """Port of the OpenAI-compatible HTTP API, on the gRPC address's host; None turns
    it off, 0 picks a free one. (`kvrelay serve router` serves it on 8000.)"""
    served_model_name: str | None = None
    """The model's name in the HTTP API (`/v1/models`, a request's `model`); None:
    `model`."""

    def __post_init__(self) -> None:
        if self.max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        if self.worker_expiry_s <= 0:
            raise ValueError("worker_expiry_s must be > 0")


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(self, relay: RequestRelay) -> None:
        self.relay = relay

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        responses = self.relay.generate(request, context.time_remaining(), caller_context(context))
        try:
            async for response in responses:
                yield response
        except InvalidRequest as err:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        except RelayError as err:
            await context.abort(err.code, err.message)


class RegistryServicer(wgrpc.RegistryServicer):
    def __init__(self, cluster: Cluster, on_change: Callable[[], Awaitable[None]]) -> None:
        self.cluster = cluster
        self.on_change = on_change
        """Called after every membership change (the router's health follows it)."""

    async def Register(self, request, context):
        try:
            await self.cluster.register(request)
        except RegistrationRefused as err:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(err))
        await self.on_change()
        return wpb.RegisterResponse(heartbeat_interval_s=self.cluster.heartbeat_interval_s)

    async def Heartbeat(self, request, context):
        known = self.cluster.heartbeat(request)
        await self.on_change()
        return wpb.HeartbeatResponse(known=known)

    async def Deregister(self, request, context):
        await self.cluster.remove(request.worker_id)
        await self.on_change()
        return wpb.DeregisterResponse()

    async def ListWorkers(self, request, context):
        now = time.monotonic()
        return wpb.ListWorkersResponse(
            model=self.cluster.model_name,
            workers=[
                wpb.WorkerInfo(
                    worker_id=w.worker_id,
                    role=_ROLE_PB[w.role],
                    address=w.address,
                    num_waiting=w.num_waiting,
                    num_running=w.num_running,
                    kv_usage=w.kv_usage,
                    last_seen_s=now - w.last_seen,
                    is_draining=w.is_draining,
                    is_stalled=w.is_stalled,
                    is_store_unavailable=w.is_store_unavailable,
                )
                for w in self.cluster.registry.workers()
            ],
        )


class RouterHealth:
    """The router's health: SERVING while a decode worker can take requests and the
    router is not draining, so a readiness probe never sends traffic to a router
    that would answer UNAVAILABLE. Updated on every membership change."""

    def __init__(self, cluster: Cluster, relay: RequestRelay) -> None:
        self.cluster = cluster
        self.relay = relay
        self.servicer: HealthServicer | None = None
        """Set once the server runs; until then it answers NOT_SERVING."""

    def is_serving(self) -> bool:
        """Whether a request sent now could be served (the HTTP API's `/health`)."""
        return not self.relay.is_draining and bool(self.cluster.workers(Role.DECODE))

    async def update(self) -> None:
        if self.servicer is None or self.relay.is_draining:
            return  # not serving yet, or the drain set NOT_SERVING for good
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self.is_serving()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", "kvrelay.v1.Generator"):
            await self.servicer.set(name, status)


@dataclass
class Router:
    """A running router: its server, cluster view and relay."""

    server: RunningServer
    cluster: Cluster
    relay: RequestRelay
    _expiry_task: asyncio.Task
    metrics_port: int | None = None
    """Where `/metrics` is served, if it is."""
    http: HttpServer | None = None
    """The OpenAI-compatible HTTP API, if it is served."""

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http else None

    async def drain(self, timeout_s: float) -> bool:
        """Refuses new requests (UNAVAILABLE) and lets those in flight finish, for at
        most `timeout_s`, then stops; returns whether they all finished."""
        self.relay.is_draining = True
        await self.server.health.enter_graceful_shutdown()
        deadline = time.monotonic() + timeout_s
        while self.relay.stats.num_inflight and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        finished = self.relay.stats.num_inflight == 0
        await self.stop(DRAIN_STOP_GRACE_S)
        return finished

    async def stop(self, grace_s: float = 2.0) -> None:
        self._expiry_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._expiry_task
        if self.http is not None:
            await self.http.stop(grace_s)
        await self.server.stop(grace_s)
        await self.relay.calls.wait_background(grace_s)
        await self.cluster.close()


async def start_router(config: RouterConfig, tokenizer: Tokenizer | None) -> Router:
    cluster = Cluster(config.model, PrefixLoadPolicy(), config.worker_expiry_s)
    metrics = ServiceMetrics(config.model, "router")
    relay = RequestRelay(
        cluster,
        GrpcWorkerClient(cluster),
        tokenizer,
        config.limits,
        config.max_inflight,
        metrics,
        config.failover,
        ChatPrompts.for_model(config.model, tokenizer),
    )
    health = RouterHealth(cluster, relay)
    server = await start_server(
        [
            ServiceBinding(
                pb_grpc.add_GeneratorServicer_to_server,
                GeneratorServicer(relay),
                "kvrelay.v1.Generator",
            ),
            ServiceBinding(
                wgrpc.add_RegistryServicer_to_server,
                RegistryServicer(cluster, health.update),
                "kvrelay.v1.Registry",
            ),
        ],
        config.address,
        # Room above the validated limit, so an oversized request reaches
        # validation and gets a message that says what to change.
        max_message_bytes=config.limits.max_request_bytes * 4,
        is_serving=False,  # until a decode worker registers
    )

    # Workers register through the Registry whatever the router's own state.
    await server.health.set("kvrelay.v1.Registry", health_pb2.HealthCheckResponse.SERVING)
    health.servicer = server.health
    await health.update()  # a worker may have registered while the server started

    async def expire_forever() -> None:
        while True:
            await asyncio.sleep(cluster.heartbeat_interval_s)
            await cluster.expire()
            await health.update()

    host = config.address.rsplit(":", 1)[0]
    metrics_port = None
    if config.metrics_port is not None:
        metrics_port = serve_metrics(metrics, config.metrics_port, host)
    http = None
    if config.http_port is not None:
        app = build_app(relay, config.served_model_name or config.model, health.is_serving)
        try:
            http = HttpServer(app, host, config.http_port)
            await http.start()
        except BaseException:
            await server.stop(0)
            await cluster.close()
            raise
    log.info("router serving %s on port %d", config.model, server.port)
    expiry = asyncio.ensure_future(expire_forever())
    return Router(server, cluster, relay, expiry, metrics_port, http)
