"""What every worker does around its servicer: serve it over gRPC, expose
`/metrics`, and keep itself registered with the router.

Each worker builds its model, store and servicer itself; `serve_worker` does the
rest the same way for both roles. Shutting down is `drain` (NOT_SERVING, the router
told, the work in flight finished) then `stop` (leave the cluster, stop the server).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from protos import workers_pb2 as wpb
from rpc.registration import LoadProbe, RouterMembership
from rpc.server import (
    DRAIN_POLL_S,
    RunningServer,
    ServiceBinding,
    dialable_address,
    start_server,
)
from telemetry.metrics import ServiceMetrics, serve_metrics

# Worker calls carry token ids, never KV (that goes through the store).
WORKER_MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_ROLE_NAMES = {wpb.WORKER_ROLE_PREFILL: "prefill", wpb.WORKER_ROLE_DECODE: "decode"}


@dataclass(frozen=True)
class WorkerAddress:
    """Where a worker listens and how it is known."""

    address: str = "127.0.0.1:0"
    """host:port to bind; port 0 picks a free one."""
    advertise_address: str | None = None
    """host:port the router should dial; default: the bound address, made dialable."""
    worker_id: str = ""
    """Unique id; empty means `<role>-<advertised address>`."""
    router: str | None = None
    """Router to register with; None serves unregistered."""
    metrics_port: int | None = None
    """Port for Prometheus `/metrics`; None turns it off, 0 picks a free one."""


@dataclass
class WorkerServer:
    """A worker's running server, metrics endpoint and router membership."""

    worker_id: str
    advertise_address: str
    server: RunningServer
    membership: RouterMembership | None
    metrics_port: int | None

    @property
    def port(self) -> int:
        return self.server.port

    async def drain(self, timeout_s: float, is_idle: Callable[[], bool]) -> bool:
        """Stops taking new work without cutting the work in flight: health reports
        NOT_SERVING and the router is told this worker is draining (it routes nothing
        new here), then waits until `is_idle()` or `timeout_s` has passed. Returns
        whether the worker went idle; the caller then stops it, which cancels what is
        left (the router resumes those requests elsewhere)."""
        await self.server.health.enter_graceful_shutdown()
        if self.membership is not None:
            await self.membership.drain()
        deadline = time.monotonic() + timeout_s
        while not is_idle() and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        return is_idle()

    async def stop(self, grace_s: float = 2.0) -> None:
        """Deregisters, then stops serving after `grace_s` for the calls in flight."""
        if self.membership is not None:
            await self.membership.stop()
        await self.server.stop(grace_s)


async def serve_worker(
    binding: ServiceBinding,
    where: WorkerAddress,
    registration: wpb.RegisterRequest,
    load: LoadProbe,
    metrics: ServiceMetrics,
) -> WorkerServer:
    """Starts serving `binding`, then registers. `registration` carries the worker's
    role, model and KV layout; its id and address are filled in here."""
    metrics_port = None
    if where.metrics_port is not None:
        metrics_port = serve_metrics(metrics, where.metrics_port, where.address.rsplit(":", 1)[0])
    server = await start_server(
        [binding], where.address, max_message_bytes=WORKER_MAX_MESSAGE_BYTES
    )
    advertise = where.advertise_address or dialable_address(where.address, server.port)
    worker_id = where.worker_id or f"{_ROLE_NAMES[registration.role]}-{advertise}"
    membership = None
    if where.router:
        registration.worker_id = worker_id
        registration.address = advertise
        membership = RouterMembership(where.router, registration, load)
        membership.start()
    return WorkerServer(worker_id, advertise, server, membership, metrics_port)
