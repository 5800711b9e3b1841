"""The decode engine: continuous batching over the paged KV pool.

One `step()` is the loop from DESIGN.md: schedule, copy in provided K/V, run one
batched forward pass, sample, and update. Requests arrive with as much of their
K/V as the caller has (blocks resident in the pool, blocks fetched from the KV
store, the prefill worker's tail); whatever is missing the engine computes itself,
so the same engine serves disaggregated requests, colocated prefill, and
recompute after preemption. Single-threaded: `EngineLoop` owns it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from decode_worker.block_pool import BlockPool, BlockPoolConfig
from decode_worker.cuda_graphs import DecodeGraphs
from decode_worker.engine_config import EngineConfig
from decode_worker.model_runner import ModelRunner
from decode_worker.scheduler import Scheduler
from decode_worker.sequence import SequenceRequest, SequenceStatus
from kvstore.hashing import BlockHash, chain_seed, hash_block
from kvstore.kv_format import AUTO
from model.loader import LoadedModel
from model.sampling import sample
from model.sampling_params import FinishReason, SamplingParams, stop_token_set

PublishBlocks = Callable[[list[tuple[BlockHash, torch.Tensor]]], None]
"""Receives (hash, payload `[L, 2, block_size, H, D]`) of full blocks the engine
computed, on the engine thread; must not block."""


class StepFailed(RuntimeError):
    """A step that raised; its requests (and only they) were aborted."""

    def __init__(self, request_ids: Sequence[str], cause: BaseException) -> None:
        super().__init__(f"decode step failed: {type(cause).__name__}: {cause}")
        self.request_ids = tuple(request_ids)


@dataclass(frozen=True)
class EngineRequest:
    """A request for the engine to continue."""

    request_id: str
    prompt_token_ids: Sequence[int]
    sampling: SamplingParams
    output_token_ids: Sequence[int] = ()
    """Output tokens generated elsewhere: a prefill worker's first token, or what a
    resumed request had sent before its decode worker failed. The engine continues
    after them; token i of a seeded request is drawn as in an uninterrupted run."""
    provided_kv: Sequence[torch.Tensor] = ()
    """K/V payloads `[L, 2, n, H, D]` of consecutive blocks from `provided_start_block`
    on; every block is full except possibly the last (the prompt's tail)."""
    provided_start_block: int = 0
    """First block of `provided_kv`; blocks before it are expected resident in the pool."""
    cache_salt: str | None = None
    """Seeds the request's hash chain with the engine's fingerprint
    (`kvstore.hashing.chain_seed`): its blocks are reused, registered and published
    only under hashes of that salt."""


@dataclass(frozen=True)
class TokenOutput:
    """One sampled token."""

    request_id: str
    token_id: int
    logprob: float
    finish_reason: FinishReason | None
    """Set on the request's last token."""
    num_cached_tokens: int
    """Prompt tokens whose K/V was found resident in the pool when the request was
    first admitted (0 for K/V provided by the caller)."""
    num_reused_tokens: int
    """Tokens of the sequence whose K/V was resident or provided at first admission;
    the rest were computed here."""
    admitted_ns: int
    """Wall clock (ns) when the request first joined the running batch."""


@dataclass(frozen=True)
class DecodeStats:
    """A snapshot of one decode engine, for heartbeats, metrics and `GetStats`."""

    num_waiting: int
    """Requests not yet admitted to the running batch."""
    num_running: int
    num_blocks: int
    """Blocks in the KV pool."""
    num_used_blocks: int
    """Blocks held by requests."""
    kv_pool_tokens: int
    """Tokens the pool holds in all: `num_blocks` x block size."""
    kv_pool_bytes: int
    """The pool's bytes, scales included."""
    kv_cache_dtype: str
    """How the pool stores K/V (`auto`, `int8`, `fp8_e4m3`)."""
    kv_usage: float
    """`num_used_blocks / num_blocks`."""
    num_computed_tokens_total: int
    num_generated_tokens_total: int
    num_finished_requests_total: int
    num_preemptions_total: int


@dataclass
class EngineCounters:
    num_computed_tokens_total: int = 0
    num_generated_tokens_total: int = 0
    num_finished_requests_total: int = 0
    num_preemptions_total: int = 0


@dataclass
class _Request:
    sampling: SamplingParams
    provided_kv: Sequence[torch.Tensor] = field(default_factory=tuple)
    provided_start_block: int = 0
    num_cached_tokens: int = 0
    num_reused_tokens: int = 0
    admitted_ns: int = 0


class DecodeEngine:
    def __init__(
        self,
        loaded: LoadedModel,
        config: EngineConfig,
        fingerprint: bytes,
        publish: PublishBlocks | None = None,
        kv_cache_dtype: str = AUTO,
    ) -> None:
        model_config = loaded.config
        pool_config = BlockPoolConfig(
            num_blocks=config.num_blocks or 1,
            block_size=config.block_size,
            num_layers=model_config.num_layers,
            num_kv_heads=model_config.num_kv_heads,
            head_dim=model_config.head_dim,
            dtype=loaded.dtype,
            kv_cache_dtype=kv_cache_dtype,
            device=str(loaded.device),
        )
        if config.num_blocks is None:
            # The same bytes hold 2x the tokens of bf16 (4x of fp32) with an 8-bit format.
            num_blocks = max(config.kv_cache_bytes // pool_config.bytes_per_block, 1)
            pool_config = BlockPoolConfig(**{**pool_config.__dict__, "num_blocks": num_blocks})
        self.loaded = loaded
        self.config = config
        self.fingerprint = fingerprint
        self._publish = publish
        self.pool = BlockPool(pool_config)
        self.scheduler = Scheduler(
            config.scheduler, self.pool, self._hash_block, model_config.full_window
        )
        self.runner = ModelRunner(loaded, self.pool)
        if loaded.device.type == "cuda" and not config.enforce_eager:
            self.runner.graphs = DecodeGraphs(
                loaded.model,
                self.pool,
                config.scheduler.max_num_seqs,
                loaded.device,
                self.runner.attention_for_graph,
            )
            try:
                self.runner.graphs.capture()
            except RuntimeError as err:
                raise RuntimeError(
                    f"capturing the decode CUDA graphs failed ({err}); "
                    "run with --enforce-eager to decode without them"
                ) from err
        self.counters = EngineCounters()
        self._requests: dict[str, _Request] = {}
        self._unadmitted: set[str] = set()  # added, not yet in the running batch

    def _hash_block(self, parent: BlockHash | None, token_ids: Sequence[int]) -> BlockHash:
        return hash_block(parent or self.fingerprint, token_ids)

    def add_request(self, request: EngineRequest) -> None:
        """Queues a request. Raises RequestTooLargeError when it could never fit in
        the pool, ValueError for a duplicate id or an inconsistent request."""
        sampling = request.sampling
        self._check_provided_kv(request.provided_kv)
        num_provided = (
            request.provided_start_block * self.config.block_size
            + sum(kv.shape[2] for kv in request.provided_kv)
            if request.provided_kv
            else 0
        )
        self.scheduler.add_request(
            SequenceRequest(
                request_id=request.request_id,
                prompt_token_ids=tuple(request.prompt_token_ids),
                output_token_ids=tuple(request.output_token_ids),
                max_new_tokens=sampling.max_tokens,
                stop_token_ids=stop_token_set(sampling, self.loaded.config.eos_token_ids),
                num_provided_tokens=num_provided,
                provided_start_block=request.provided_start_block,
                hash_seed=chain_seed(self.fingerprint, request.cache_salt),
            )
        )
        self._requests[request.request_id] = _Request(
            sampling, request.provided_kv, request.provided_start_block
        )
        self._unadmitted.add(request.request_id)

    def _check_provided_kv(self, provided_kv: Sequence[torch.Tensor]) -> None:
        """Checked here, so that copying them in at admission cannot fail for one
        request (and so fail the step of every other)."""
        config, block_size = self.loaded.config, self.config.block_size
        for i, kv in enumerate(provided_kv):
            is_last = i == len(provided_kv) - 1
            num_tokens = kv.shape[2] if kv.dim() == 5 else -1
            row_width = self.pool.kv_format.row_width(config.head_dim)
            expected = (config.num_layers, 2, num_tokens, config.num_kv_heads, row_width)
            if (
                tuple(kv.shape) != expected
                or not 0 < num_tokens <= block_size
                or (num_tokens < block_size and not is_last)
            ):
                raise ValueError(
                    f"provided K/V block {i} has shape {tuple(kv.shape)}; expected "
                    f"[{config.num_layers}, 2, {block_size}, {config.num_kv_heads}, "
                    f"{row_width}] (the last may hold fewer tokens)"
                )
            if kv.dtype != self.pool.kv.dtype:
                raise ValueError(
                    f"provided K/V block {i} is {kv.dtype}; the pool holds {self.pool.kv.dtype}"
                )

    def abort(self, request_id: str) -> bool:
        """Ends a request wherever it is and frees its blocks; False if unknown."""
        self._requests.pop(request_id, None)
        self._unadmitted.discard(request_id)
        return self.scheduler.abort(request_id)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def count_resident(self, block_hashes: Sequence[BlockHash]) -> int:
        """Leading blocks of the chain that admission would reuse from the pool (0 with
        prefix reuse off)."""
        if not self.config.scheduler.enable_prefix_caching:
            return 0
        return self.pool.lookup_prefix(block_hashes)

    def stats(self) -> DecodeStats:
        """May be read from another thread without a lock: each field is one read of
        a counter or a length, and the snapshot is for reporting only."""
        counters = self.counters
        return DecodeStats(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            num_blocks=self.pool.num_blocks,
            num_used_blocks=self.pool.num_used_blocks,
            kv_pool_tokens=self.pool.num_blocks * self.pool.block_size,
            kv_pool_bytes=self.pool.num_blocks * self.pool.config.bytes_per_block,
            kv_cache_dtype=self.pool.config.kv_cache_dtype,
            kv_usage=self.pool.usage(),
            num_computed_tokens_total=counters.num_computed_tokens_total,
            num_generated_tokens_total=counters.num_generated_tokens_total,
            num_finished_requests_total=counters.num_finished_requests_total,
            num_preemptions_total=counters.num_preemptions_total,
        )

    def step(self) -> list[TokenOutput]:
        """Runs one scheduled step. Raises StepFailed when it could not: then only
        the requests of that step are aborted (their blocks freed), and the engine
        is ready for the next step with every other request as it was."""
        step = self.scheduler.schedule()
        self.counters.num_preemptions_total += len(step.preempted_request_ids)
        try:
            for fill in step.kv_fills:
                request = self._requests[fill.request_id]
                payload = request.provided_kv[fill.logical_block_idx - request.provided_start_block]
                self.pool.write_block(fill.block_id, payload)
            self._note_admissions()
            if step.is_empty:
                self.scheduler.update({})
                return []
            request_ids, logits = self.runner.run(step)
            sequences = [self.scheduler.get(rid) for rid in request_ids]
            token_ids, logprobs = sample(
                logits,
                [self._requests[rid].sampling for rid in request_ids],
                [seq.num_output_tokens for seq in sequences],
            )
        except Exception as err:
            failed = sorted(
                {s.request_id for s in (*step.decodes, *step.prefills)}
                | {f.request_id for f in step.kv_fills}
            )
            for request_id in failed:
                self.abort(request_id)
            self.scheduler.update({})  # skips the aborted: nothing else moved
            raise StepFailed(failed, err) from err
        self.counters.num_computed_tokens_total += step.num_scheduled_tokens
        self.scheduler.update(dict(zip(request_ids, token_ids, strict=True)))
        self._publish_computed_blocks()
        outputs = []
        for seq, token_id, logprob in zip(sequences, token_ids, logprobs, strict=True):
            request = self._requests[seq.request_id]
            outputs.append(
                TokenOutput(
                    seq.request_id,
                    token_id,
                    logprob,
                    seq.finish_reason,
                    request.num_cached_tokens,
                    request.num_reused_tokens,
                    request.admitted_ns,
                )
            )
            if seq.finish_reason is not None:
                del self._requests[seq.request_id]
                self.counters.num_finished_requests_total += 1
        self.counters.num_generated_tokens_total += len(outputs)
        return outputs

    def _publish_computed_blocks(self) -> None:
        """Hands the blocks this step filled to `publish` (one copy off the pool for
        all of them; the store put happens on the publisher's thread)."""
        computed = self.scheduler.take_computed_blocks()
        if not computed or self._publish is None:
            return
        payloads = self.pool.read_blocks([block_id for _, block_id in computed])
        self._publish([(h, payloads[:, :, i]) for i, (h, _) in enumerate(computed)])

    def _note_admissions(self) -> None:
        """Records what each newly admitted request found resident, and drops provided
        K/V once copied in: after a preemption the sequence recomputes instead, so
        keeping the tensors would only hold memory."""
        # Only requests still waiting are looked at, so a step costs nothing per
        # request already running.
        for request_id in list(self._unadmitted):
            seq = self.scheduler.get(request_id)
            if seq.status is not SequenceStatus.RUNNING:
                continue
            self._unadmitted.discard(request_id)
            request = self._requests[request_id]
            request.admitted_ns = time.time_ns()
            request.num_reused_tokens = seq.num_computed_tokens
            if not request.provided_kv:
                request.num_cached_tokens = seq.num_computed_tokens
            request.provided_kv = ()
