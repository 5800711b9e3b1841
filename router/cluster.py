"""The cluster as the router sees it: registered workers, their channels, and the
model parameters every worker must agree on.

The first worker to register fixes the cluster's model (name, KV fingerprint,
block size, vocabulary, context length); a worker that disagrees is refused, so a
mis-deployed worker can never receive a block it would misread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from protos import workers_pb2 as wpb
from router.registry import Role, WorkerEntry, WorkerRegistry
from router.routing import RoutingPolicy
from rpc.channel import open_channel

log = logging.getLogger(__name__)

_ROLES = {wpb.WORKER_ROLE_PREFILL: Role.PREFILL, wpb.WORKER_ROLE_DECODE: Role.DECODE}

Connect = Callable[[str], grpc.aio.Channel]
"""Opens a channel to a worker's `host:port`."""


class RegistrationRefused(ValueError):
    """A worker that cannot join this cluster; the message says why."""


@dataclass(frozen=True)
class ClusterModel:
    """What every worker of the cluster shares."""

    model: str
    kv_fingerprint: bytes
    block_size: int
    vocab_size: int
    max_context_len: int


class Cluster:
    """Workers by id, with an open channel each. Used from the router's event loop only."""

    def __init__(
        self,
        model: str,
        policy: RoutingPolicy,
        expiry_s: float = 6.0,
        connect: Connect = open_channel,
    ) -> None:
        self.model_name = model
        self.policy = policy
        self.heartbeat_interval_s = expiry_s / 3
        self.registry = WorkerRegistry(expiry_s)
        self.model: ClusterModel | None = None
        self._connect = connect
        self._channels: dict[str, grpc.aio.Channel] = {}

    async def register(self, request: wpb.RegisterRequest) -> WorkerEntry:
        role = _ROLES.get(request.role)
        if role is None:
            raise RegistrationRefused("role must be WORKER_ROLE_PREFILL or WORKER_ROLE_DECODE")
        if request.model != self.model_name:
            raise RegistrationRefused(
                f"worker serves model {request.model!r}; this router serves {self.model_name!r}"
            )
        offered = ClusterModel(
            request.model,
            request.kv_fingerprint,
            request.block_size,
            request.vocab_size,
            request.max_context_len,
        )
        if self.model is not None and offered != self.model:
            raise RegistrationRefused(
                f"worker's KV layout {offered} differs from the cluster's {self.model}; "
                "start it with the same model, dtype and block size"
            )
        self.model = offered
        old = self._channels.pop(request.worker_id, None)
        if old is not None:
            await old.close()
        entry = self.registry.register(
            request.worker_id, role, request.address, request.max_local_prefill_len
        )
        self._channels[request.worker_id] = self._connect(request.address)
        log.info("worker %s (%s) registered at %s", request.worker_id, role.value, request.address)
        return entry

    def heartbeat(self, request: wpb.HeartbeatRequest) -> bool:
        return self.registry.heartbeat(
            request.worker_id, request.num_waiting, request.num_running, request.kv_usage
        )

    async def remove(self, worker_id: str) -> None:
        self.registry.deregister(worker_id)
        self.policy.forget_worker(worker_id)
        channel = self._channels.pop(worker_id, None)
        if channel is not None:
            log.info("worker %s left", worker_id)
            await channel.close()

    async def expire(self) -> None:
        for entry in self.registry.expire():
            log.warning("worker %s missed its heartbeats; dropping it", entry.worker_id)
            await self.remove(entry.worker_id)

    def workers(self, role: Role) -> list[WorkerEntry]:
        """The live workers of a role, in registration order."""
        return self.registry.workers(role)

    def channel(self, worker_id: str) -> grpc.aio.Channel | None:
        """The open channel to a live worker; None once it left."""
        return self._channels.get(worker_id)

    async def close(self) -> None:
        for worker_id in list(self._channels):
            await self.remove(worker_id)
