"""`TailHandoff`: a request whose caller leaves while its K/V is being put keeps
its published blocks but not its tail, which no decode worker will ever take."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from kvstore.hashing import hash_prompt, hash_token_blocks
from kvstore.memory_store import MemoryStore
from kvstore.spec import BlockSpec
from kvstore.store import StoreUnavailableError
from prefill_worker.handoff import TailHandoff

SPEC = BlockSpec("test:handoff", num_layers=2, num_kv_heads=1, head_dim=4, block_size=4)
PROMPT = list(range(6))  # one full block and a 2-token tail
HASHES = hash_token_blocks(PROMPT, SPEC.block_size, SPEC.fingerprint)
PROMPT_HASH = hash_prompt(PROMPT, SPEC.block_size, SPEC.fingerprint)


class GatedStore(MemoryStore):
    """A memory store whose `gated` call ("put" or "put_tail") waits until the
    test opens the gate, then does its work or raises `failure`."""

    def __init__(self, gated: str, failure: Exception | None = None) -> None:
        super().__init__(SPEC)
        self.gated = gated
        self.failure = failure
        self.entered = threading.Event()
        self.gate = threading.Event()

    def put(self, blocks: list) -> None:
        self._pass("put")
        super().put(blocks)

    def put_tail(self, request_id: str, kv: torch.Tensor, prompt_hash: bytes) -> None:
        self._pass("put_tail")
        super().put_tail(request_id, kv, prompt_hash)

    def _pass(self, call: str) -> None:
        if call != self.gated:
            return
        self.entered.set()
        assert self.gate.wait(10), "the test never opened the gate"
        if self.failure is not None:
            raise self.failure


def prompt_kv() -> torch.Tensor:
    return torch.randn(SPEC.num_layers, 2, len(PROMPT), SPEC.num_kv_heads, SPEC.head_dim)


def publish(store: GatedStore, *, is_cancelled: bool, with_tail: bool = True) -> TailHandoff:
    """Publishes the prompt, cancelling the caller while the gated call waits."""

    async def scenario() -> TailHandoff:
        handoff = TailHandoff(store)
        task = asyncio.ensure_future(
            handoff.publish(
                "req",
                HASHES,
                prompt_kv(),
                first_block=0,
                with_tail=with_tail,
                prompt_hash=PROMPT_HASH,
            )
        )
        assert await asyncio.to_thread(store.entered.wait, 10)
        if is_cancelled:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        store.gate.set()
        if not is_cancelled:
            await task
        assert await asyncio.to_thread(handoff.wait_idle, 10)
        return handoff

    return asyncio.run(scenario())


@pytest.mark.parametrize("gated", ["put", "put_tail"])
def test_a_caller_leaving_mid_put_leaves_no_tail_behind(gated: str) -> None:
    store = GatedStore(gated)
    handoff = publish(store, is_cancelled=True)
    assert store.num_tails() == 0
    assert store.lookup(HASHES) == 1  # the full block stays, for later prompts
    assert handoff.num_running == 0


def test_a_caller_that_stays_finds_its_tail() -> None:
    store = GatedStore("put_tail")
    publish(store, is_cancelled=False)
    assert store.num_tails() == 1
    assert store.get_tail("req", PROMPT_HASH) is not None


def test_without_a_tail_a_cancel_only_keeps_the_blocks() -> None:
    store = GatedStore("put")
    publish(store, is_cancelled=True, with_tail=False)
    assert (store.num_tails(), store.lookup(HASHES)) == (0, 1)


def test_a_put_failing_after_the_caller_left_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = GatedStore("put_tail", failure=StoreUnavailableError("redis went away"))
    handoff = publish(store, is_cancelled=True)
    assert store.num_tails() == 0 and handoff.num_running == 0
    assert "redis went away" in caplog.text


def test_a_put_failing_while_the_caller_waits_reaches_it() -> None:
    store = GatedStore("put_tail", failure=StoreUnavailableError("redis went away"))
    with pytest.raises(StoreUnavailableError, match="redis went away"):
        publish(store, is_cancelled=False)
