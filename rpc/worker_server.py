"""What every worker does around its servicer: serve it over gRPC, expose
`/metrics`, and keep itself registered with the router.

Each worker builds its model, store and servicer itself; `serve_worker` does the
rest the same way for both roles. Shutting down is `drain` (NOT_SERVING, the router
told, the work in flight finished) then `stop` (leave the cluster, stop the server).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from protos import workers_pb2 as wpb
from rpc.registration import LoadProbe, RouterMembership
from rpc.server import (
    DRAIN_POLL_S,
    RunningServer,
    ServiceBinding,
    dialable_address,
    start_server,
)
from rpc.tls import ClusterTLS
from telemetry.metrics import ServiceMetrics, serve_metrics

if TYPE_CHECKING:
    from kvstore import KVStore

log = logging.getLogger(__name__)

# Worker calls carry token ids, never KV (that goes through the store).
WORKER_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_ROLE_NAMES = {wpb.WORKER_ROLE_PREFILL: "prefill", wpb.WORKER_ROLE_DECODE: "decode"}


@dataclass(frozen=True)
class WorkerAddress:
    """Where a worker listens, how it is known and how its peers are authenticated."""

    address: str = "127.0.0.1:0"
    """host:port to bind; port 0 picks a free one."""
    advertise_address: str | None = None
    """host:port the router should dial; default: the bound address, made dialable."""
    worker_id: str = ""
    """Unique id; empty means `<role>-<advertised address>`."""
    router: str | None = None
    """The router's internal (Registry) address to register with; None serves
    unregistered."""
    metrics_port: int | None = None
    """Port for Prometheus `/metrics`; None turns it off, 0 picks a free one."""
    metrics_host: str = "127.0.0.1"
    """Address `/metrics` binds (`--metrics-host`)."""
    tls: ClusterTLS | None = None
    """Cluster mTLS: the worker serves only peers the cluster CA certified and
    registers over it; None: plaintext (a warning at start-up)."""


STORE_HEALTH_SERVICE = "kvrelay.v1.KVStore"
"""The health service name that reports the worker's KV store (SERVING: reachable)."""
HEALTH_INTERVAL_S = 1.0
STORE_PROBE_TIMEOUT_S = 2.0


class WorkerHealth:
    """What a worker's health answers, kept current by `watch()`.

    Overall health (and the worker's own service) means "can serve": SERVING unless
    the engine is stalled (`is_stalled()`, e.g. no progress for the stall timeout
    with work queued) or the worker drains. The store has its own health service,
    `kvrelay.v1.KVStore`: a worker whose store is down still serves (it computes
    what it cannot fetch), so that is reported, never NOT_SERVING overall. Both go
    to the router in every heartbeat; a stalled worker gets no work until it
    recovers, by itself, as soon as its engine moves again.
    """

    def __init__(
        self,
        health: HealthServicer,
        service_name: str,
        is_stalled: Callable[[], bool],
        store: KVStore | None,
    ) -> None:
        self._health = health
        self._service_name = service_name
        self._is_engine_stalled = is_stalled
        self._store = store
        self.is_stalled = False
        self.is_store_unavailable = False

    async def check(self) -> None:
        """Probes the engine and the store once and updates the health answers."""
        self.is_stalled = self._is_engine_stalled()
        if self._store is not None:
            try:
                async with asyncio.timeout(STORE_PROBE_TIMEOUT_S):
                    is_healthy = await asyncio.to_thread(self._store.is_healthy)
            except TimeoutError:
                is_healthy = False
            self.is_store_unavailable = not is_healthy
            await self._health.set(STORE_HEALTH_SERVICE, _status(is_healthy))
        serving = _status(not self.is_stalled)
        for name in ("", self._service_name):
            await self._health.set(name, serving)

    async def watch(self) -> None:
        """Checks every `HEALTH_INTERVAL_S` until cancelled."""
        while True:
            await self.check()
            await asyncio.sleep(HEALTH_INTERVAL_S)

    def annotate(self, beat: wpb.HeartbeatRequest) -> wpb.HeartbeatRequest:
        beat.is_stalled = self.is_stalled
        beat.is_store_unavailable = self.is_store_unavailable
        return beat


def _status(is_serving: bool) -> int:
    return (
        health_pb2.HealthCheckResponse.SERVING
        if is_serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )


@dataclass
class WorkerServer:
    """A worker's running server, metrics endpoint, health and router membership."""

    worker_id: str
    advertise_address: str
    server: RunningServer
    membership: RouterMembership | None
    metrics_port: int | None
    health: WorkerHealth
    _watch: asyncio.Task

    @property
    def port(self) -> int:
        return self.server.port

    async def drain(self, timeout_s: float, is_idle: Callable[[], bool]) -> bool:
        """Stops taking new work without cutting the work in flight: health reports
        NOT_SERVING and the router is told this worker is draining (it routes nothing
        new here), then waits until `is_idle()` or `timeout_s` has passed. Returns
        whether the worker went idle; the caller then stops it, which cancels what is
        left (the router resumes those requests elsewhere)."""
        await self._stop_watching()
        await self.server.health.enter_graceful_shutdown()
        if self.membership is not None:
            await self.membership.drain()
        deadline = time.monotonic() + timeout_s
        while not is_idle() and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        return is_idle()

    async def stop(self, grace_s: float = 2.0) -> None:
        """Deregisters, then stops serving after `grace_s` for the calls in flight."""
        await self._stop_watching()
        if self.membership is not None:
            await self.membership.stop()
        await self.server.stop(grace_s)

    async def _stop_watching(self) -> None:
        self._watch.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._watch


async def serve_worker(
    binding: ServiceBinding,
    where: WorkerAddress,
    registration: wpb.RegisterRequest,
    load: LoadProbe,
    metrics: ServiceMetrics,
    *,
    is_stalled: Callable[[], bool] = lambda: False,
    store: KVStore | None = None,
) -> WorkerServer:
    """Starts serving `binding`, then registers. `registration` carries the worker's
    role, model and KV layout; its id and address are filled in here. Health
    follows `is_stalled` and the store (see `WorkerHealth`)."""
    metrics_port = None
    if where.metrics_port is not None:
        metrics_port = serve_metrics(metrics, where.metrics_port, where.metrics_host)
    if where.tls is None:
        log.warning(
            "cluster TLS is off: anyone who reaches this worker's port may call it; give "
            "every service --tls-dir (see `kvrelay certs`)"
        )
    server = await start_server(
        [binding],
        where.address,
        max_message_bytes=WORKER_MAX_MESSAGE_BYTES,
        tls=where.tls.server_credentials() if where.tls else None,
    )
    health = WorkerHealth(server.health, binding.full_name, is_stalled, store)
    await health.check()
    watch = asyncio.ensure_future(health.watch())
    advertise = where.advertise_address or dialable_address(where.address, server.port)
    worker_id = where.worker_id or f"{_ROLE_NAMES[registration.role]}-{advertise}"
    membership = None
    if where.router:
        registration.worker_id = worker_id
        registration.address = advertise
        membership = RouterMembership(
            where.router, registration, lambda: health.annotate(load()), where.tls
        )
        membership.start()
    return WorkerServer(worker_id, advertise, server, membership, metrics_port, health, watch)
