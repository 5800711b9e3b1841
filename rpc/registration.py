"""A worker's membership in a router's cluster: register, heartbeat, deregister.

The heartbeat loop re-registers when the router says it does not know the worker
(the router restarted) and keeps trying while the router is unreachable, so
workers and routers can be started and restarted in any order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import grpc

from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc
from rpc.channel import open_channel
from rpc.tls import ClusterTLS

log = logging.getLogger(__name__)

RETRY_INTERVAL_S = 1.0
CALL_TIMEOUT_S = 2.0

LoadProbe = Callable[[], wpb.HeartbeatRequest]
"""Returns the worker's current load (worker_id is filled in by the membership)."""


class RouterMembership:
    """Keeps one worker registered with one router until `stop()`."""

    def __init__(
        self,
        router_address: str,
        registration: wpb.RegisterRequest,
        load: LoadProbe,
        tls: ClusterTLS | None = None,
    ) -> None:
        self.registration = registration
        self._load = load
        self._channel = open_channel(router_address, tls=tls)
        self._stub = wgrpc.RegistryStub(self._channel)
        self._task: asyncio.Task | None = None
        self.is_registered = asyncio.Event()
        self.is_draining = False

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def _register(self) -> float:
        response = await self._stub.Register(self.registration, timeout=CALL_TIMEOUT_S)
        self.is_registered.set()
        log.info("registered with the router as %s", self.registration.worker_id)
        return response.heartbeat_interval_s

    async def _run(self) -> None:
        interval = RETRY_INTERVAL_S
        known = False
        while True:
            try:
                if not known:
                    interval = await self._register()
                    known = True
                known = await self._heartbeat()
            except grpc.aio.AioRpcError as err:
                # A heartbeat that fails (a slow or restarting router) is retried: the
                # worker re-registers only when the router answers it does not know it,
                # so a missed beat never re-registers (which used to cut its calls).
                if err.code() == grpc.StatusCode.FAILED_PRECONDITION:
                    log.error("the router refused this worker: %s", err.details())
                    known = False
                    self.is_registered.clear()
                else:
                    log.warning("router unreachable (%s); retrying", err.code().name)
                interval = RETRY_INTERVAL_S
            await asyncio.sleep(interval)

    async def _heartbeat(self) -> bool:
        beat = self._load()
        beat.worker_id = self.registration.worker_id
        beat.is_draining = self.is_draining
        known = (await self._stub.Heartbeat(beat, timeout=CALL_TIMEOUT_S)).known
        if not known:
            self.is_registered.clear()
        return known

    async def drain(self) -> None:
        """Tells the router at once that this worker takes no new work (and keeps
        saying so in every heartbeat); its calls in flight go on."""
        self.is_draining = True
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._heartbeat()

    async def stop(self) -> None:
        """Stops heartbeating and leaves the cluster, so no new work arrives."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(grpc.aio.AioRpcError):
            await self._stub.Deregister(
                wpb.DeregisterRequest(worker_id=self.registration.worker_id),
                timeout=CALL_TIMEOUT_S,
            )
        await self._channel.close()
