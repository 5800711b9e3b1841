"""The router, prefill and decode services as Ray actor classes.

Plain classes: `deploy.ray_launcher` turns them into actors with `ray.remote(...)`
and the placement, restart and resource options of its launch. Each constructor
starts its gRPC service on a `ServiceThread` and returns once the server is
listening, so a created actor is a serving one. A worker binds port 0 on its node's
IP and advertises `node_ip:port`; when Ray restarts a dead worker actor, the
constructor runs again with the same arguments, binds a new port and registers
under the same worker id, which replaces the dead entry in the router.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import ray

from decode_worker.config import DecodeConfig
from deploy.service_thread import ServiceThread
from prefill_worker.config import PrefillConfig
from router.service import RouterConfig
from telemetry import names
from telemetry.tracing import setup_tracing, shutdown_tracing


@dataclass(frozen=True)
class ActorInfo:
    """Where an actor's service runs (for progress lines, `status` and tests)."""

    address: str
    """host:port of its gRPC server, dialable from the other nodes."""
    pid: int
    """The actor's process id on its node."""
    node_id: str
    """Ray node id (hex) of the node it runs on."""
    internal_address: str = ""
    """The router's: host:port of its Registry, where workers register."""


class _ServiceActor:
    """Common part: logging, tracing, the service thread and what it reports."""

    _host: ServiceThread

    def __init__(self, service_name: str) -> None:
        logging.basicConfig(
            level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        # `kvrelay up` passes its OTEL_* variables through the runtime env.
        setup_tracing(service_name)
        self._node_ip = ray.util.get_node_ip_address()

    def info(self) -> ActorInfo:
        return ActorInfo(
            address=f"{self._node_ip}:{self._host.port}",
            pid=os.getpid(),
            node_id=ray.get_runtime_context().get_node_id(),
        )

    def stop(self, drain_timeout_s: float = 0.0) -> None:
        """Stops serving, after draining for at most `drain_timeout_s` when that is
        set (workers deregister first); the launcher kills the actor next."""
        self._host.stop(drain_timeout_s=drain_timeout_s)
        shutdown_tracing()


class RouterActor(_ServiceActor):
    """The router, serving Generator on `config.address` and Registry on its
    internal address."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__(names.SERVICE_ROUTER)
        from model.tokenizer import tokenizer_for_model
        from router.service import start_router

        tokenizer = tokenizer_for_model(config.model)
        self._host = ServiceThread(lambda: start_router(config, tokenizer), "kvrelay-router")

    def info(self) -> ActorInfo:
        internal = f"{self._node_ip}:{self._host.service.internal_port}"
        return dataclasses.replace(super().info(), internal_address=internal)


class PrefillActor(_ServiceActor):
    """A prefill worker registered with `config.router`."""

    def __init__(self, config: PrefillConfig) -> None:
        super().__init__(names.SERVICE_PREFILL)
        from prefill_worker.service import start_prefill_worker

        where = dataclasses.replace(config.where, address=f"{self._node_ip}:0")
        config = dataclasses.replace(config, where=where)
        self._host = ServiceThread(lambda: start_prefill_worker(config), "kvrelay-prefill")


class DecodeActor(_ServiceActor):
    """A decode worker registered with `config.router`."""

    def __init__(self, config: DecodeConfig) -> None:
        super().__init__(names.SERVICE_DECODE)
        from decode_worker.service import start_decode_worker

        where = dataclasses.replace(config.where, address=f"{self._node_ip}:0")
        config = dataclasses.replace(config, where=where)
        self._host = ServiceThread(lambda: start_decode_worker(config), "kvrelay-decode")
