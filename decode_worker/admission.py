"""Decode admission: what a request brings, what the pool already holds, and what
must be fetched, turned into the `EngineRequest` the engine continues.

A prefilled request names its prompt's block hashes. Blocks resident in this
worker's pool are reused by the scheduler at admission; the rest (and the tail)
are fetched from the KV store in a thread, beside the engine loop, which never
waits for them. A request without a prefill is computed here in full.
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
from kvstore import BlockHash, KVStore
from model.config import ModelConfig
from model.prompt_limits import check_prompt
from model.sampling_params import SamplingParams
from telemetry import names
from telemetry.metrics import ServiceMetrics

tracer = trace.get_tracer("kvrelay.decode")


@dataclass(frozen=True)
class PrefillHandoff:
    """What a prefill worker handed on: its token and where the prompt's K/V is."""

    first_token_id: int
    """Output token 0."""
    first_logprob: float
    block_hashes: tuple[BlockHash, ...]
    """The prompt's full blocks, in order; all were put in the store."""
    tail_id: str
    """The store key of the prompt's partial last block; empty when there is none."""


@dataclass(frozen=True)
class DecodeCall:
    """One Decode request as plain data."""

    request_id: str
    prompt_token_ids: Sequence[int]
    sampling: SamplingParams
    prefill: PrefillHandoff | None = None
    """None: the prompt is prefilled here (short prompts, colocated serving)."""


@dataclass(frozen=True)
class Admission:
    """A request ready for the engine, and how its K/V was found."""

    request: EngineRequest
    num_resident_blocks: int
    """Leading prompt blocks resident in the pool when it was looked at."""
    num_fetched_blocks: int
    """Blocks (and the tail) fetched from the store."""


class DecodeAdmission:
    """Builds engine requests for one engine loop and store; event-loop only."""

    def __init__(
        self,
        loop: EngineLoop,
        store: KVStore,
        model: ModelConfig,
        device: torch.device,
        dtype: torch.dtype,
        metrics: ServiceMetrics,
    ) -> None:
        self.loop = loop
        self.store = store
        self.model = model
        self.device = device
        self.dtype = dtype
        self.metrics = metrics

    async def admit(self, call: DecodeCall, parent: Context | None = None) -> Admission:
        """Raises InvalidPrompt. Cancelling it while the store is read leaves nothing
        behind: the fetch thread finishes (and deletes the tail) on its own, and the
        engine never heard of the request."""
        check_prompt(
            call.prompt_token_ids,
            call.sampling.max_tokens,
            vocab_size=self.model.vocab_size,
            max_context_len=self.model.max_position_embeddings,
        )
        prefill = call.prefill
        if prefill is None:
            return Admission(
                EngineRequest(call.request_id, call.prompt_token_ids, call.sampling), 0, 0
            )
        hashes = list(prefill.block_hashes)
        with tracer.start_as_current_span(names.SPAN_DECODE_ADMISSION, context=parent) as span:
            num_resident = self.loop.count_resident(hashes)
            provided = await self._fetch(hashes[num_resident:], prefill.tail_id)
            span.set_attribute(names.NUM_RESIDENT_BLOCKS, num_resident)
            span.set_attribute(names.NUM_FETCHED_BLOCKS, len(provided))
        request = EngineRequest(
            call.request_id,
            call.prompt_token_ids,
            call.sampling,
            first_token=(prefill.first_token_id, prefill.first_logprob),
            provided_kv=[t.to(self.device, self.dtype) for t in provided],
            provided_start_block=num_resident,
        )
        return Admission(request, num_resident, len(provided))

    async def _fetch(self, hashes: list[BlockHash], tail_id: str) -> list[torch.Tensor]:
        with tracer.start_as_current_span(names.SPAN_STORE_GET) as span:
            started = time.perf_counter()
            provided = await asyncio.to_thread(fetch_prompt_kv, self.store, hashes, tail_id)
            self.metrics.kv_transfer_time.observe(time.perf_counter() - started)
            span.set_attribute(names.NUM_BLOCKS, len(provided))
            span.set_attribute(names.NUM_BYTES, sum(t.nbytes for t in provided))
        return provided
