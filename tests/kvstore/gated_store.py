"""`GatedStore`: a real memory store that holds one chosen call at a gate until the
test opens it, so a test can cancel a flow while that call is in flight."""

from __future__ import annotations

import threading

from kvstore.memory_store import MemoryStore
from kvstore.spec import BlockSpec

GATE_TIMEOUT_S = 10.0


class GatedStore(MemoryStore):
    """`gated` names the method that waits ("lookup", "get", "put", "put_tail",
    "get_tail"); `entered` is set when a call reaches the gate. `failure`, if set,
    is raised by the gated call after the gate opens."""

    def __init__(self, spec: BlockSpec, gated: str = "", failure: Exception | None = None) -> None:
        super().__init__(spec)
        self.gated = gated
        self.failure = failure
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.calls: list[str] = []

    def open(self) -> None:
        self.gate.set()

    def lookup(self, hashes):
        self._pass("lookup")
        return super().lookup(hashes)

    def get(self, hashes):
        self._pass("get")
        return super().get(hashes)

    def get_into(self, hashes, out):
        self._pass("get")
        return super().get_into(hashes, out)

    def put(self, blocks):
        self._pass("put")
        super().put(blocks)

    def put_tail(self, request_id, kv, prompt_hash):
        self._pass("put_tail")
        super().put_tail(request_id, kv, prompt_hash)

    def get_tail(self, request_id, prompt_hash):
        self._pass("get_tail")
        return super().get_tail(request_id, prompt_hash)

    def _pass(self, call: str) -> None:
        self.calls.append(call)
        if call != self.gated:
            return
        self.entered.set()
        assert self.gate.wait(GATE_TIMEOUT_S), "the test never opened the gate"
        if self.failure is not None:
            raise self.failure
