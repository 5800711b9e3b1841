"""The cluster as the router sees it: registered workers, their channels, and the
model parameters every worker must agree on.

The first worker to register fixes the cluster's model (name, KV fingerprint,
KV cache dtype, block size, vocabulary, context length); a worker that disagrees is refused, so a
mis-deployed worker can never receive a block it would misread.

Membership changes never cut a call in flight. A worker that registers again at
the same address keeps its entry and channel. A worker that leaves (deregisters
after draining) keeps its channel until its last call ends. A worker that missed
its heartbeats for the expiry time is declared lost: its calls fail over at once
(`WorkerEntry.declare_lost`) and its channel is closed.
"""

from __future__ import annotations

import logging
import time
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
    kv_cache_dtype: str = "auto"


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
        self.expiry_s = expiry_s
        self._connect = connect
        self._channels: dict[str, grpc.aio.Channel] = {}
        # Channels of workers that left, kept until their calls end: (entry, channel,
        # when it left).
        self._retired: list[tuple[WorkerEntry, grpc.aio.Channel, float]] = []

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
            request.kv_cache_dtype or "auto",
        )
        if self.model is not None and offered.kv_cache_dtype != self.model.kv_cache_dtype:
            raise RegistrationRefused(
                f"worker stores K/V as {offered.kv_cache_dtype!r}, the cluster as "
                f"{self.model.kv_cache_dtype!r}: start it with --kv-cache-dtype "
                f"{self.model.kv_cache_dtype}, so that no block is read in another format"
            )
        if self.model is not None and offered != self.model:
            raise RegistrationRefused(
                f"worker's KV layout {offered} differs from the cluster's {self.model}; "
                "start it with the same model, dtype and block size"
            )
        self.model = offered
        known = self.registry.get(request.worker_id)
        entry = self.registry.register(
            request.worker_id, role, request.address, request.max_local_prefill_len
        )
        if entry is known and request.worker_id in self._channels:
            log.info("worker %s registered again at %s", request.worker_id, request.address)
            return entry
        old = self._channels.pop(request.worker_id, None)
        if old is not None and known is not None:
            self._retire(known, old)  # it restarted elsewhere; its old calls may still end
        self._channels[request.worker_id] = self._connect(request.address)
        log.info("worker %s (%s) registered at %s", request.worker_id, role.value, request.address)
        return entry

    def heartbeat(self, request: wpb.HeartbeatRequest) -> bool:
        entry = self.registry.get(request.worker_id)
        if entry is not None:
            if request.is_draining and not entry.is_draining:
                log.info("worker %s is draining; routing nothing new to it", request.worker_id)
            if request.is_stalled != entry.is_stalled:
                if request.is_stalled:
                    log.warning("worker %s is stalled; routing nothing to it", request.worker_id)
                else:
                    log.info("worker %s recovered from a stall", request.worker_id)
        return self.registry.heartbeat(
            request.worker_id,
            request.num_waiting,
            request.num_running,
            request.kv_usage,
            request.is_draining,
            request.is_stalled,
            request.is_store_unavailable,
        )

    async def remove(self, worker_id: str) -> None:
        """A worker left: routing forgets it, and its channel closes once its last
        call has ended."""
        entry = self.registry.deregister(worker_id)
        self.policy.forget_worker(worker_id)
        channel = self._channels.pop(worker_id, None)
        if channel is not None and entry is not None:
            log.info("worker %s left", worker_id)
            self._retire(entry, channel)
        await self._close_idle_retired()

    async def expire(self) -> None:
        """Declares lost the workers that missed their heartbeats for the expiry time
        (their calls fail over), and closes channels no call uses any more."""
        for entry in self.registry.expire():
            log.warning("worker %s missed its heartbeats; failing over its calls", entry.worker_id)
            self.policy.forget_worker(entry.worker_id)
            entry.declare_lost()
            channel = self._channels.pop(entry.worker_id, None)
            if channel is not None:
                await channel.close()
        await self._close_idle_retired()

    def workers(self, role: Role) -> list[WorkerEntry]:
        """The workers of a role new work may go to (not draining), in registration
        order."""
        return [w for w in self.registry.workers(role) if w.is_routable]

    def _retire(self, entry: WorkerEntry, channel: grpc.aio.Channel) -> None:
        self._retired.append((entry, channel, time.monotonic()))

    async def _close_idle_retired(self) -> None:
        now, kept = time.monotonic(), []
        for entry, channel, since in self._retired:
            if entry.num_inflight == 0 or now - since > self.expiry_s:
                if entry.num_inflight:
                    entry.declare_lost()  # its calls have had the expiry time
                await channel.close()
            else:
                kept.append((entry, channel, since))
        self._retired = kept

    @property
    def num_retired_channels(self) -> int:
        """Channels of departed workers still open for their calls (for tests)."""
        return len(self._retired)

    def channel(self, worker_id: str) -> grpc.aio.Channel | None:
        """The open channel to a registered worker; None once it left."""
        return self._channels.get(worker_id)

    async def close(self) -> None:
        for worker_id in list(self._channels):
            self.registry.deregister(worker_id)
            await self._channels.pop(worker_id).close()
        for _, channel, _ in self._retired:
            await channel.close()
        self._retired = []
