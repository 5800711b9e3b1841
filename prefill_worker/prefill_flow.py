"""One request through a prefill worker, as plain async code.

`PrefillFlow.run` is the prefill half of the request path: check the prompt, claim
the blocks no other request is computing (wait for those it is), load the cached
prefix from the store, run the engine over the rest, then publish the new blocks
and the tail. The servicer converts the request, calls it, and converts the
`PrefillOutcome` back; the tests drive it with the memory store and no sockets.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

from opentelemetry import trace

from kvstore import BlockHash, KVStore, StoreUnavailableError, hash_token_blocks
from kvstore.hashing import first_seen_block, hash_prompt
from model.config import ModelConfig
from model.prompt_limits import check_prompt
from model.sampling_params import FinishReason, SamplingParams, finish_reason, stop_token_set
from prefill_worker.engine import PrefillEngine, PrefillJob, PrefillOutput
from prefill_worker.handoff import TailHandoff
from prefill_worker.inflight_prefixes import InflightPrefixes
from prefill_worker.store_io import load_cached_prefix
from rpc.limits import Overloaded
from telemetry import names
from telemetry.metrics import ServiceMetrics

log = logging.getLogger(__name__)
tracer = trace.get_tracer("kvrelay.prefill")


@dataclass(frozen=True)
class PrefillOutcome:
    """What one prefill produced (the servicer's `PrefillResult`)."""

    first_token_id: int
    """Output token 0, sampled here."""
    first_logprob: float
    has_tail: bool
    """The partial last block is in the store under the request's id (`tail_id`),
    for the router to hand on: it owns the tail from now on."""
    tail_id: str
    """The id the tail is stored under (the request id this prefill ran for)."""
    num_cached_tokens: int
    """Leading prompt tokens loaded from the store instead of computed."""
    num_computed_tokens: int
    finish_reason: FinishReason | None
    """Set when the first token ends the request; then no tail was stored."""


class PrefillFlow:
    """Prefills requests on one engine and one store; event-loop only."""

    def __init__(
        self,
        engine: PrefillEngine,
        store: KVStore,
        model: ModelConfig,
        metrics: ServiceMetrics,
        *,
        enable_prefix_cache: bool = True,
        max_queued: int | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.model = model
        self.metrics = metrics
        self.enable_prefix_cache = enable_prefix_cache
        self.inflight = InflightPrefixes()
        self.handoff = TailHandoff(store)
        self.num_active = 0
        """Requests in the flow now; a draining worker waits for none."""
        self.max_queued = max_queued
        """Prompts held but not computing at most (None: no bound); past it, Overloaded."""
        self.num_store_failures_total = 0
        """Prefills whose K/V could not be published (the store failed)."""

    @property
    def num_queued(self) -> int:
        """Prompts in the flow besides the one computing: the engine takes every
        job it is given into its batch, so only what the flow holds bounds it."""
        return max(self.num_active - 1, 0)

    async def run(
        self,
        request_id: str,
        token_ids: list[int],
        sampling: SamplingParams,
        cache_salt: str | None = None,
    ) -> PrefillOutcome:
        """`cache_salt` (checked by the caller) seeds the prompt's block hashes, so
        only prompts of the same salt share blocks here. Raises Overloaded, InvalidPrompt, PrefillCancelled (the engine dropped the job), or
        CancelledError; whatever it raises, the tail is deleted and every claimed
        block released. A store that fails is no error of the request: the first
        token is still returned, with no tail, and the decode worker computes what
        it cannot fetch."""
        if self.max_queued is not None and self.num_queued >= self.max_queued:
            raise Overloaded(
                f"this prefill worker has {self.num_queued} prompts queued, its "
                f"--max-queued; retry on another"
            )
        self.num_active += 1
        try:
            return await self._run(request_id, token_ids, sampling, cache_salt)
        finally:
            self.num_active -= 1

    async def _run(
        self,
        request_id: str,
        token_ids: list[int],
        sampling: SamplingParams,
        cache_salt: str | None,
    ) -> PrefillOutcome:
        check_prompt(
            token_ids,
            sampling.max_tokens,
            vocab_size=self.model.vocab_size,
            max_context_len=self.model.max_position_embeddings,
        )
        spec = self.store.spec
        hashes = hash_token_blocks(token_ids, spec.block_size, spec.fingerprint, cache_salt)
        # Requests sharing a prefix wait for the one computing it (only when they
        # can reuse it: with the cache off every request computes its own).
        shared = hashes if self.enable_prefix_cache else []
        async with self.inflight.claim(shared) as claim:
            job = self.engine.new_job(request_id, token_ids, sampling)
            num_present = await self._load_cached_prefix(hashes, job)
            # Blocks the store had need no waiting for; the rest wait for publishing.
            claim.release_leading(num_present)
            output = await self._compute(job)
            finished = finish_reason(
                output.first_token_id,
                1,
                stop_token_set(sampling, self.model.eos_token_ids),
                sampling.max_tokens,
            )
            prompt_hash = hash_prompt(token_ids, spec.block_size, spec.fingerprint, cache_salt)
            first_block = num_present
            window = self.model.full_window
            if window is not None:
                # Decode reads only what its first token's window reaches.
                needed = first_seen_block(len(token_ids), window, spec.block_size)
                first_block = max(num_present, needed)
            is_stored = await self._publish(
                request_id, hashes, output, first_block, finished is None, prompt_hash
            )
        block_size = self.store.spec.block_size
        return PrefillOutcome(
            first_token_id=output.first_token_id,
            first_logprob=output.first_logprob,
            has_tail=is_stored and finished is None and len(token_ids) % block_size != 0,
            tail_id=request_id,
            num_cached_tokens=job.num_cached_tokens,
            num_computed_tokens=len(token_ids) - job.num_cached_tokens,
            finish_reason=finished,
        )

    async def _load_cached_prefix(self, hashes: list[BlockHash], job: PrefillJob) -> int:
        """Copies the prompt's stored prefix into the job; returns the blocks present."""
        with tracer.start_as_current_span(names.SPAN_STORE_LOOKUP) as span:
            started = time.perf_counter()
            num_present, job.num_cached_tokens = 0, 0
            if self.enable_prefix_cache:
                num_present, job.num_cached_tokens = await asyncio.to_thread(
                    load_cached_prefix, self.store, hashes, job.kv, self.model.full_window
                )
            if job.num_cached_tokens:
                self.metrics.kv_transfer_time.observe(time.perf_counter() - started)
            span.set_attribute(names.NUM_BLOCKS, len(hashes))
            span.set_attribute(names.NUM_HITS, num_present)
            span.set_attribute(names.CACHED_PROMPT_TOKENS, job.num_cached_tokens)
        return num_present

    async def _compute(self, job: PrefillJob) -> PrefillOutput:
        submitted_ns = time.time_ns()
        try:
            output = await asyncio.wrap_future(self.engine.submit(job))
        except asyncio.CancelledError:
            self.engine.cancel(job)
            raise
        self._record_engine_spans(job, submitted_ns)
        return output

    async def _publish(
        self,
        request_id: str,
        hashes: list[BlockHash],
        output: PrefillOutput,
        num_present: int,
        with_tail: bool,
        prompt_hash: BlockHash,
    ) -> bool:
        """Puts the new blocks and the tail (bound to `prompt_hash`, so that only a
        decode call for this prompt can read it); False (logged, counted by the
        store) when the store failed, which leaves no tail behind."""
        with tracer.start_as_current_span(names.SPAN_STORE_PUT) as span:
            span.set_attribute(names.NUM_BLOCKS, len(hashes) - num_present)
            started = time.perf_counter()
            try:
                await self.handoff.publish(
                    request_id,
                    hashes,
                    output.kv,
                    first_block=num_present,
                    with_tail=with_tail,
                    prompt_hash=prompt_hash,
                )
            except StoreUnavailableError as err:
                log.warning("KV store unavailable; the decode worker computes the prompt: %s", err)
                span.set_status(trace.StatusCode.ERROR, str(err))
                self.num_store_failures_total += 1
                return False
            self.metrics.kv_transfer_time.observe(time.perf_counter() - started)
            return True

    def _record_engine_spans(self, job: PrefillJob, submitted_ns: int) -> None:
        """The engine thread timed the job; its queueing and forward spans are
        recorded here, with those times, as children of the current span."""
        queue_span = tracer.start_span(names.SPAN_PREFILL_QUEUE, start_time=submitted_ns)
        queue_span.end(end_time=job.started_ns)
        forward_span = tracer.start_span(names.SPAN_PREFILL_FORWARD, start_time=job.started_ns)
        forward_span.set_attribute(names.CACHED_PROMPT_TOKENS, job.num_cached_tokens)
        forward_span.set_attribute(
            names.COMPUTED_PROMPT_TOKENS, len(job.token_ids) - job.num_cached_tokens
        )
        forward_span.end(end_time=job.finished_ns)
        self.metrics.queue_time.observe((job.started_ns - submitted_ns) / 1e9)
