"""The router's gRPC servicers (Generator, Registry) and its serve loop.

Servicers are thin: they convert statuses and call `RequestRelay` / `Cluster`.

The router serves two ports. The public one serves `Generate` (behind API keys
when set), the HTTP API beside it, health and reflection. The internal one serves
only `Registry`, with its health and reflection: it is where workers register and
`kvrelay status` lists them, and with cluster TLS it takes only peers whose
certificate the cluster CA signed. Nothing public can register, deregister or list
a worker.
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
from router.api_keys import REFUSAL, ApiKeys
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
from rpc.channel import open_channel
from rpc.server import DRAIN_POLL_S, DRAIN_STOP_GRACE_S, RunningServer, ServiceBinding, start_server
from rpc.tls import ClusterTLS, PublicTLS
from telemetry.metrics import ServiceMetrics, serve_metrics
from telemetry.propagation import caller_context

log = logging.getLogger(__name__)

_ROLE_PB = {Role.PREFILL: wpb.WORKER_ROLE_PREFILL, Role.DECODE: wpb.WORKER_ROLE_DECODE}


@dataclass(frozen=True)
class RouterConfig:
    """How a router runs."""

    model: str
    """Model name or directory; workers must register with the same."""
    address: str = "127.0.0.1:50051"
    """host:port of the public API: Generate (and the HTTP API's host)."""
    internal_address: str | None = None
    """host:port of the Registry, where workers register; None: the public host and
    port + 1 (any free port when the public one is 0)."""
    tls: ClusterTLS | None = None
    """Cluster mTLS for the internal port and every call to a worker; None: plaintext."""
    public_tls: PublicTLS | None = None
    """TLS for the public port (gRPC and HTTP); None: plaintext."""
    api_keys: ApiKeys = field(default_factory=ApiKeys)
    """Keys the public API requires; none: it is open."""
    salt_per_key: bool = False
    """Each API key gets a prefix cache of its own (`--salt-per-key`): its digest
    scopes every request's block hashes, with the request's `cache_salt`."""
    limits: RequestLimits = field(default_factory=RequestLimits)
    """What requests may ask for."""
    max_inflight: int = 256
    """Requests served at once; past it, RESOURCE_EXHAUSTED."""
    worker_expiry_s: float = 6.0
    """A worker silent for this long is dropped; it heartbeats every third of it."""
    metrics_port: int | None = None
    """Port for Prometheus `/metrics`; None turns it off, 0 picks a free one."""
    metrics_host: str = "127.0.0.1"
    """Address `/metrics` binds (`--metrics-host`)."""
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
        if self.salt_per_key and not self.api_keys.is_required:
            raise ValueError("--salt-per-key needs API keys (--api-keys-file or KVRELAY_API_KEYS)")

    @property
    def registry_address(self) -> str:
        if self.internal_address is not None:
            return self.internal_address
        host, port = self.address.rsplit(":", 1)
        return f"{host}:{int(port) + 1 if int(port) else 0}"


class GeneratorServicer(pb_grpc.GeneratorServicer):
    def __init__(self, relay: RequestRelay, api_keys: ApiKeys, salt_per_key: bool = False) -> None:
        self.relay = relay
        self.api_keys = api_keys
        self.salt_per_key = salt_per_key

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        authorization = dict(context.invocation_metadata() or ()).get("authorization")
        if not self.api_keys.allows(authorization):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSAL)
        key_salt = self.api_keys.salt_of(authorization) if self.salt_per_key else None
        responses = self.relay.generate(
            request, context.time_remaining(), caller_context(context), key_salt=key_salt
        )
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
            kv_cache_dtype=self.cluster.model.kv_cache_dtype if self.cluster.model else "",
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
    """A running router: its public and internal servers, cluster view and relay."""

    server: RunningServer
    """The public port: Generate, health, reflection."""
    internal: RunningServer
    """The internal port: Registry, health, reflection."""
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
    def internal_port(self) -> int:
        return self.internal.port

    @property
    def http_port(self) -> int | None:
        return self.http.port if self.http else None

    async def drain(self, timeout_s: float) -> bool:
        """Refuses new requests (UNAVAILABLE) and lets those in flight finish, for at
        most `timeout_s`, then stops; returns whether they all finished. The
        Registry keeps serving meanwhile, so workers still heartbeat."""
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
        await self.internal.stop(grace_s)
        await self.cluster.close()


async def start_router(config: RouterConfig, tokenizer: Tokenizer | None) -> Router:
    if config.tls is None:
        log.warning(
            "cluster TLS is off: the internal port and the calls to workers are plaintext; "
            "give every service --tls-dir (see `kvrelay certs`)"
        )
    if not config.api_keys.is_required:
        log.warning("no API keys: anyone who reaches the public port may generate")

    def connect(address: str) -> grpc.aio.Channel:
        return open_channel(address, tls=config.tls)

    cluster = Cluster(config.model, PrefixLoadPolicy(), config.worker_expiry_s, connect)
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
    internal = await start_server(
        [
            ServiceBinding(
                wgrpc.add_RegistryServicer_to_server,
                RegistryServicer(cluster, health.update),
                "kvrelay.v1.Registry",
            )
        ],
        config.registry_address,
        max_message_bytes=config.limits.max_request_bytes,
        tls=config.tls.server_credentials() if config.tls else None,
    )
    try:
        server = await start_server(
            [
                ServiceBinding(
                    pb_grpc.add_GeneratorServicer_to_server,
                    GeneratorServicer(relay, config.api_keys, config.salt_per_key),
                    "kvrelay.v1.Generator",
                )
            ],
            config.address,
            # Room above the validated limit, so an oversized request reaches
            # validation and gets a message that says what to change.
            max_message_bytes=config.limits.max_request_bytes * 4,
            tls=config.public_tls.server_credentials() if config.public_tls else None,
            is_serving=False,  # until a decode worker registers
        )
    except BaseException:
        await internal.stop(0)
        raise
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
        metrics_port = serve_metrics(metrics, config.metrics_port, config.metrics_host)
    http = None
    if config.http_port is not None:
        app = build_app(
            relay,
            config.served_model_name or config.model,
            health.is_serving,
            config.api_keys,
            config.salt_per_key,
        )
        try:
            http = HttpServer(app, host, config.http_port, config.public_tls)
            await http.start()
        except BaseException:
            await server.stop(0)
            await internal.stop(0)
            await cluster.close()
            raise
    log.info(
        "router serving %s on port %d (Registry on port %d)",
        config.model,
        server.port,
        internal.port,
    )
    expiry = asyncio.ensure_future(expire_forever())
    return Router(server, internal, cluster, relay, expiry, metrics_port, http)
