"""Builds a kvrelay gRPC server: the services, health, reflection and limits.

Every service answers `grpc.health.v1.Health` (overall and per service) and server
reflection, so `grpcurl` and load balancers work without the `.proto` files.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from rpc.limits import channel_options

AddServicer = Callable[[object, grpc.aio.Server], None]

DEFAULT_DRAIN_TIMEOUT_S = 30.0
"""How long a draining service lets its requests finish (`--drain-timeout`)."""
DRAIN_POLL_S = 0.05
DRAIN_STOP_GRACE_S = 1.0
"""After a drain: how long the server waits for calls before cancelling them."""


@dataclass(frozen=True)
class ServiceBinding:
    """One service to serve: its generated `add_*Servicer_to_server`, the servicer
    object and its full name (e.g. `kvrelay.v1.Generator`)."""

    add: AddServicer
    servicer: object
    full_name: str


@dataclass
class RunningServer:
    """A started server, the port it bound and its health servicer."""

    server: grpc.aio.Server
    port: int
    health: HealthServicer

    async def stop(self, grace_s: float = 5.0) -> None:
        """Reports NOT_SERVING, then lets in-flight calls finish for `grace_s`."""
        await self.health.enter_graceful_shutdown()
        await self.server.stop(grace_s)


async def start_server(
    bindings: Sequence[ServiceBinding],
    address: str,
    *,
    max_message_bytes: int,
    tls: grpc.ServerCredentials | None = None,
    is_serving: bool = True,
) -> RunningServer:
    """Starts serving `bindings` on `address` (`host:port`; port 0 picks a free one).
    Health answers SERVING from the start, or NOT_SERVING until the caller says so
    (`is_serving=False`)."""
    server = grpc.aio.server(options=channel_options(max_message_bytes))
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for binding in bindings:
        binding.add(binding.servicer, server)
    names = [b.full_name for b in bindings]
    reflection.enable_server_reflection(
        [
            *names,
            health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
            reflection.SERVICE_NAME,
        ],
        server,
    )
    port = server.add_secure_port(address, tls) if tls else server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"cannot bind gRPC server to {address}")
    await server.start()
    status = (
        health_pb2.HealthCheckResponse.SERVING
        if is_serving
        else health_pb2.HealthCheckResponse.NOT_SERVING
    )
    for name in ["", *names]:
        await health.set(name, status)
    return RunningServer(server=server, port=port, health=health)


def dialable_address(bind_address: str, port: int) -> str:
    """The host:port peers should dial for a server bound to `bind_address`: a
    wildcard host (0.0.0.0, [::]) is not dialable, so the machine's name stands in."""
    host = bind_address.rsplit(":", 1)[0]
    if host in ("0.0.0.0", "[::]", ""):
        host = socket.gethostname()
    return f"{host}:{port}"
