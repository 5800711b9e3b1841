"""Decode admission: what a request brings, what the pool already holds, and what
must be fetched, turned into the `EngineRequest` the engine continues.

The worker hashes the request's tokens itself (prompt, then the output tokens it
already has) and trusts no hash a caller sends. Leading blocks resident in this
worker's pool are reused by the scheduler at admission; the rest are fetched from
the KV store in a thread, beside the engine loop, which never waits for them: all
of them for a prefilled request (and its tail), and whatever the store holds for
any other (a prompt prefilled here whose prefix another worker computed, the next
turn of a conversation, or a request resumed after its decode worker failed).
Whatever is neither resident nor fetched is computed here. At least the last
token is always computed: its logits give the next token.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from opentelemetry import trace
from opentelemetry.context import Context

from decode_worker.engine import EngineRequest
from decode_worker.engine_loop import EngineLoop
from decode_worker.kv_fetch import fetch_prompt_kv
from kvstore import BlockHash, KVStore, hash_token_blocks
from kvstore.hashing import first_seen_block, hash_prompt
from model.config import ModelConfig
from model.prompt_limits import check_prompt, check_token_id, check_token_ids
from model.sampling_params import SamplingParams
from telemetry import names
from telemetry.metrics import ServiceMetrics

tracer = trace.get_tracer("kvrelay.decode")


@dataclass(frozen=True)
class PrefillHandoff:
    """What a prefill worker handed on besides its token: where the prompt's tail is."""

    tail_id: str
    """The store key of the prompt's partial last block; empty when there is none."""


@dataclass(frozen=True)
class DecodeCall:
    """One Decode request as plain data."""

    request_id: str
    prompt_token_ids: Sequence[int]
    sampling: SamplingParams
    generated_token_ids: Sequence[int] = ()
    """Output tokens the caller already has: the prefill worker's first token (exactly
    that one when `prefill` is set), or what a resumed request had sent."""
    prefill: PrefillHandoff | None = None
    """Set when a prefill worker stored the prompt's K/V for this request."""
    cache_salt: str | None = None
    """Seeds the hash chain (checked by the caller): the request shares resident,
    fetched and published blocks only with requests of the same salt."""

    def __post_init__(self) -> None:
        if self.prefill is not None and len(self.generated_token_ids) != 1:
            raise ValueError(
                "a prefilled call continues after exactly one token, the prefill "
                f"worker's; got {len(self.generated_token_ids)}"
            )

    @property
    def is_resumed(self) -> bool:
        """Continued here after another decode worker failed it."""
        return self.prefill is None and bool(self.generated_token_ids)


@dataclass(frozen=True)
class Admission:
    """A request ready for the engine, and how its K/V was found."""

    request: EngineRequest
    num_resident_blocks: int
    """Leading prompt blocks resident in the pool when it was looked at."""
    num_fetched_blocks: int
    """Blocks (and the tail) fetched from the store."""


def check_call(call: DecodeCall, model: ModelConfig) -> None:
    """Raises InvalidPrompt unless every token id the caller sent is in the
    vocabulary and the prompt and its answer fit the model's context."""
    check_prompt(
        call.prompt_token_ids,
        call.sampling.max_tokens,
        vocab_size=model.vocab_size,
        max_context_len=model.max_position_embeddings,
    )
    if call.prefill is not None:
        # The prefill worker's token, the one output token so far.
        (first_token_id,) = call.generated_token_ids
        check_token_id(first_token_id, model.vocab_size, "prefill.first_token_id")
    else:
        check_token_ids(call.generated_token_ids, model.vocab_size, "generated_token_ids")


class DecodeAdmission:
    """Builds engine requests for one engine loop and store; event-loop only."""

    def __init__(
        self,
        loop: EngineLoop,
        store: KVStore,
        model: ModelConfig,
        metrics: ServiceMetrics,
    ) -> None:
        self.loop = loop
        self.store = store
        self.model = model
        self.metrics = metrics

    async def admit(self, call: DecodeCall, parent: Context | None = None) -> Admission:
        """Raises InvalidPrompt. Cancelling it while the store is read leaves nothing
        behind: the fetch thread finishes (and deletes the tail) on its own, and the
        engine never heard of the request."""
        check_call(call, self.model)
        tokens = [*call.prompt_token_ids, *call.generated_token_ids]
        spec = self.store.spec
        # Blocks that can be reused: all full ones but the one holding the last token.
        num_reusable = (len(tokens) - 1) // spec.block_size
        hashes = hash_token_blocks(tokens, spec.block_size, spec.fingerprint, call.cache_salt)
        hashes = hashes[:num_reusable]
        tail_id = call.prefill.tail_id if call.prefill is not None else ""
        # With a window on every layer, the blocks before the one the last token's
        # window reaches are never read: not looked for, not fetched.
        window = self.model.full_window
        num_skipped = first_seen_block(len(tokens) - 1, window, spec.block_size) if window else 0
        num_skipped = min(num_skipped, len(hashes))
        with tracer.start_as_current_span(names.SPAN_DECODE_ADMISSION, context=parent) as span:
            num_resident = num_skipped + self.loop.count_resident(hashes[num_skipped:])
            provided = []
            if num_resident < len(hashes) or tail_id:
                # The tail is read for this prompt only: one a caller names for
                # another prompt is a miss.
                prompt_hash = hash_prompt(
                    call.prompt_token_ids, spec.block_size, spec.fingerprint, call.cache_salt
                )
                provided = await self._fetch(hashes[num_resident:], tail_id, prompt_hash)
            span.set_attribute(names.NUM_RESIDENT_BLOCKS, num_resident)
            span.set_attribute(names.NUM_FETCHED_BLOCKS, len(provided))
        request = EngineRequest(
            call.request_id,
            call.prompt_token_ids,
            call.sampling,
            output_token_ids=call.generated_token_ids,
            # Kept in host memory until admission copies them into the pool, as
            # they are (the store's rows are the pool's): a waiting request holds no
            # device memory outside its budget.
            provided_kv=provided,
            provided_start_block=num_resident,
            cache_salt=call.cache_salt,
        )
        return Admission(request, num_resident, len(provided))

    async def _fetch(
        self, hashes: list[BlockHash], tail_id: str, prompt_hash: BlockHash
    ) -> list[torch.Tensor]:
        with tracer.start_as_current_span(names.SPAN_STORE_GET) as span:
            started = time.perf_counter()
            provided = await asyncio.to_thread(
                fetch_prompt_kv, self.store, hashes, tail_id, prompt_hash
            )
            self.metrics.kv_transfer_time.observe(time.perf_counter() - started)
            span.set_attribute(names.NUM_BLOCKS, len(provided))
            span.set_attribute(names.NUM_BYTES, sum(t.nbytes for t in provided))
        return provided
