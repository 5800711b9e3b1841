"""The decode engine's thread, and the thread-safe doors into it.

gRPC handlers run on the event loop; the engine runs on this thread and never
waits for them. Handlers `submit` a request with a sink that receives each
`TokenOutput` (or the exception that ended the request) and `abort` it when the
client goes away. Commands are applied between steps, so the engine itself stays
single-threaded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from decode_worker.engine import (
    DecodeEngine,
    DecodeStats,
    EngineRequest,
    StepFailed,
    TokenOutput,
)
from decode_worker.scheduler import RequestTooLargeError
from kvstore.hashing import BlockHash

log = logging.getLogger(__name__)

Sink = Callable[[TokenOutput | BaseException], None]
"""Receives a request's outputs on the engine thread; must not block."""


@dataclass(frozen=True)
class _Submit:
    request: EngineRequest
    sink: Sink


@dataclass(frozen=True)
class _Abort:
    request_id: str


class EngineLoop:
    def __init__(self, engine: DecodeEngine) -> None:
        self.engine = engine
        self._inbox: queue.SimpleQueue[_Submit | _Abort | None] = queue.SimpleQueue()
        self._sinks: dict[str, Sink] = {}
        self._thread = threading.Thread(target=self._run, name="decode-engine", daemon=True)
        self.last_progress = time.monotonic()
        """When the engine last finished a step or an idle wait (monotonic seconds)."""

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the thread; requests still running are aborted (their blocks freed)."""
        self._inbox.put(None)
        self._thread.join()

    def submit(self, request: EngineRequest, sink: Sink) -> None:
        self._inbox.put(_Submit(request, sink))

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def count_resident(self, block_hashes: Sequence[BlockHash]) -> int:
        """Leading blocks resident in the pool. Read from another thread without a lock:
        each lookup is one dict read, and the answer is advice (admission re-checks)."""
        return self.engine.count_resident(block_hashes)

    def stats(self) -> DecodeStats:
        """The engine's snapshot; safe from any thread."""
        return self.engine.stats()

    def is_stalled(self, timeout_s: float) -> bool:
        """Whether the engine cannot serve: its thread is gone, or it has had work
        and made no progress for `timeout_s`. Safe from any thread."""
        if not self._thread.is_alive():
            return self._thread.ident is not None  # started, then died
        has_work = bool(self._sinks) or not self._inbox.empty()
        return has_work and time.monotonic() - self.last_progress > timeout_s

    def _run(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            is_idle = not self.engine.has_unfinished()
            if not self._apply_commands(block=is_idle):
                break
            if is_idle:
                self.last_progress = time.monotonic()
            if self.engine.has_unfinished():
                self._step()
        for request_id in list(self._sinks):
            self.engine.abort(request_id)
            _deliver(self._sinks.pop(request_id), RuntimeError("decode worker shutting down"))

    def _apply_commands(self, block: bool) -> bool:
        """Applies queued submits and aborts; False when asked to stop."""
        try:
            command = self._inbox.get(block=block)
            while True:
                if command is None:
                    return False
                if isinstance(command, _Abort):
                    self.engine.abort(command.request_id)
                    self._sinks.pop(command.request_id, None)
                else:
                    self._add(command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _add(self, command: _Submit) -> None:
        try:
            self.engine.add_request(command.request)
        except (RequestTooLargeError, ValueError) as err:
            _deliver(command.sink, err)
            return
        self._sinks[command.request.request_id] = command.sink

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except StepFailed as err:  # fails that step's requests, never the worker
            log.exception("decode step failed; failing its %d requests", len(err.request_ids))
            for request_id in err.request_ids:
                sink = self._sinks.pop(request_id, None)
                if sink is not None:
                    _deliver(sink, err)
            return
        finally:
            self.last_progress = time.monotonic()
        for out in outputs:
            sink = self._sinks.get(out.request_id)
            if sink is None:
                continue
            if out.finish_reason is not None:
                del self._sinks[out.request_id]
            if not _deliver(sink, out):
                # Nobody can hear the request any more (its event loop is gone).
                self.engine.abort(out.request_id)
                self._sinks.pop(out.request_id, None)


def _deliver(sink: Sink, item: TokenOutput | BaseException) -> bool:
    """Hands `item` to a sink; False when the sink failed. A sink must not block or
    raise, but one whose event loop has closed does, and that must cost its request,
    never the engine thread every other request runs on."""
    try:
        sink(item)
    except Exception:
        log.warning("dropping a request whose caller is gone", exc_info=True)
        return False
    return True
