"""`TailHandoff`: a request whose caller leaves while its K/V is being put keeps
its published blocks but not its tail, which no decode worker will ever take."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from kvstore.hashing import hash_token_blocks
from kvstore.memory_store import MemoryStore
from kvstore.spec import BlockSpec
from prefill_worker.handoff import TailHandoff

SPEC = BlockSpec("test:handoff", num_layers=2, num_kv_heads=1, head_dim=4, block_size=4)
PROMPT = list(range(6))  # one full block and a 2-token tail
HASHES = hash_token_blocks(PROMPT, SPEC.block_size, SPEC.fingerprint)


class GatedStore(MemoryStore):
    """A memory store whose `put_tail` waits until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__(SPEC)
        self.put_tail_started = threading.Event()
        self.gate = threading.Event()

    def put_tail(self, request_id: str, kv: torch.Tensor) -> None:
        self.put_tail_started.set()
        assert self.gate.wait(10), "the test never opened the gate"
        super().put_tail(request_id, kv)


def prompt_kv() -> torch.Tensor:
    return torch.randn(SPEC.num_layers, 2, len(PROMPT), SPEC.num_kv_heads, SPEC.head_dim)


async def publish_and_maybe_cancel(store: GatedStore, is_cancelled: bool) -> TailHandoff:
    handoff = TailHandoff(store)
    task = asyncio.ensure_future(handoff.publish("req", HASHES, prompt_kv(), 0, True))
    assert await asyncio.to_thread(store.put_tail_started.wait, 10)
    if is_cancelled:
        task.cancel()
    store.gate.set()
    if is_cancelled:
        with pytest.raises(asyncio.CancelledError):
            await task
    else:
        await task
    for _ in range(500):
        if handoff.num_pending == 0:
            break
        await asyncio.sleep(0.01)
    assert handoff.num_pending == 0
    return handoff


def test_a_caller_leaving_mid_put_leaves_no_tail_behind() -> None:
    store = GatedStore()
    asyncio.run(publish_and_maybe_cancel(store, is_cancelled=True))
    assert store.num_tails() == 0
    assert store.lookup(HASHES) == 1  # the full block stays, for later prompts


def test_a_caller_that_stays_finds_its_tail() -> None:
    store = GatedStore()
    asyncio.run(publish_and_maybe_cancel(store, is_cancelled=False))
    assert store.num_tails() == 1
    assert store.get_tail("req") is not None
