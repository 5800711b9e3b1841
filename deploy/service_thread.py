"""`ServiceThread`: runs one asyncio gRPC service on an event loop of its own thread.

A Ray actor's methods are called from Ray's own threads, and its constructor must
return once the service is up. The services are `grpc.aio` servers that need a
running loop for their whole life, so each actor owns one thread that runs a loop
forever; the constructor starts the service on it and waits, and `stop()` stops the
service there and ends the loop.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Protocol


class Service(Protocol):
    """What `start_router`, `start_prefill_worker` and `start_decode_worker` return."""

    @property
    def port(self) -> int: ...

    async def stop(self, grace_s: float = 2.0) -> None: ...

    async def drain(self, timeout_s: float) -> bool: ...


class ServiceThread:
    """Starts `start()` on a new thread's event loop and keeps serving until `stop()`.

    The constructor blocks until the service is started and re-raises what
    `start()` raised (the thread is then gone). Not restartable.
    """

    def __init__(self, start: Callable[[], Awaitable[Service]], name: str) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=name, daemon=True)
        self._thread.start()
        try:
            self.service = asyncio.run_coroutine_threadsafe(start(), self._loop).result()
        except BaseException:
            self._end_loop()
            raise

    @property
    def port(self) -> int:
        return self.service.port

    def stop(self, grace_s: float = 2.0, drain_timeout_s: float = 0.0) -> None:
        """Stops the service, then ends the thread: after draining it for at most
        `drain_timeout_s` when that is set, else giving in-flight calls `grace_s`."""
        if not self._thread.is_alive():
            return
        if drain_timeout_s > 0:
            done = self.service.drain(drain_timeout_s)
        else:
            done = self.service.stop(grace_s)
        asyncio.run_coroutine_threadsafe(done, self._loop).result()
        self._end_loop()

    def _end_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
