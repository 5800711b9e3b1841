"""The prefill engine: one thread that runs the model over queued prompts.

Each step packs running jobs into one flattened forward pass under a token
budget, oldest first; a prompt longer than what is left of the budget gets a
chunk, and continues from its own K/V on the next step. So one huge prompt
cannot hold the others back, and chunked prefill is just scheduling fewer tokens.
A job is done when `num_computed_tokens` reaches its prompt length; then its
first output token is sampled.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

import torch

from kvstore.kv_format import AUTO
from kvstore.kv_quant import KVCacheFormat
from model.attention import ContiguousKVAttention
from model.loader import LoadedModel
from model.sampling import sample
from model.sampling_params import SamplingParams

log = logging.getLogger(__name__)


class PrefillCancelled(Exception):
    """The job was cancelled before it finished."""


@dataclass(frozen=True)
class PrefillOutput:
    first_token_id: int
    first_logprob: float
    kv: torch.Tensor
    """[num_layers, 2, prompt_len, num_kv_heads, row_width]: the whole prompt's K/V,
    as stored rows (`PrefillEngine.kv_format`)."""


@dataclass
class PrefillJob:
    """One prompt to prefill, continuing from `num_cached_tokens` of loaded K/V."""

    request_id: str
    token_ids: list[int]
    sampling: SamplingParams
    kv: torch.Tensor
    """Preallocated K/V of the whole prompt; the first num_cached_tokens are filled in."""
    num_cached_tokens: int = 0
    num_computed_tokens: int = field(init=False)
    future: Future = field(default_factory=Future)
    is_cancelled: bool = False
    started_ns: int = 0
    """Wall clock (ns) when its first chunk was scheduled, for the queueing span."""
    finished_ns: int = 0
    """Wall clock (ns) when its first token was sampled."""

    def __post_init__(self) -> None:
        assert 0 <= self.num_cached_tokens < len(self.token_ids), "at least one token to compute"
        self.num_computed_tokens = self.num_cached_tokens

    @property
    def num_remaining_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens


@dataclass
class PrefillCounters:
    num_computed_tokens_total: int = 0
    num_cached_tokens_total: int = 0
    num_finished_requests_total: int = 0


@dataclass(frozen=True)
class PrefillStats:
    """A snapshot of the engine, for heartbeats, metrics and `GetStats`."""

    num_waiting: int
    """Jobs submitted, not yet picked up by the engine thread."""
    num_running: int
    """Jobs being computed."""
    num_computed_tokens_total: int
    num_cached_tokens_total: int
    num_finished_requests_total: int


class PrefillEngine:
    """Runs `PrefillJob`s on a dedicated thread. `submit` and `cancel` are thread-safe."""

    def __init__(self, loaded: LoadedModel, token_budget: int, kv_cache_dtype: str = AUTO) -> None:
        if token_budget < 1:
            raise ValueError("token_budget must be >= 1")
        self.loaded = loaded
        self.token_budget = token_budget
        self.kv_format = KVCacheFormat(kv_cache_dtype, loaded.dtype)
        """How the jobs' K/V is stored: an 8-bit format quantizes each row once, as
        it is computed, so what is published is what attention read."""
        self.counters = PrefillCounters()
        self._inbox: queue.SimpleQueue[PrefillJob | None] = queue.SimpleQueue()
        self._running: list[PrefillJob] = []
        self._lock = threading.Lock()
        self._num_queued = 0
        self._thread = threading.Thread(target=self._loop, name="prefill-engine", daemon=True)
        self.last_progress = time.monotonic()
        """When the engine last finished a step or an idle wait (monotonic seconds)."""

    def new_job(
        self, request_id: str, token_ids: list[int], sampling: SamplingParams
    ) -> PrefillJob:
        """A job with its K/V buffer allocated, ready for cached blocks to be copied in."""
        config = self.loaded.config
        row_width = self.kv_format.row_width(config.head_dim)
        kv = torch.empty(
            (config.num_layers, 2, len(token_ids), config.num_kv_heads, row_width),
            dtype=self.kv_format.storage_dtype,
            device=self.loaded.device,
        )
        return PrefillJob(request_id, token_ids, sampling, kv)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._inbox.put(None)
        self._thread.join()

    def submit(self, job: PrefillJob) -> Future:
        assert 0 <= job.num_cached_tokens < len(job.token_ids), "at least one token to compute"
        job.num_computed_tokens = job.num_cached_tokens
        with self._lock:
            self._num_queued += 1
        self._inbox.put(job)
        return job.future

    def cancel(self, job: PrefillJob) -> None:
        """The job ends at the next step boundary; its future raises PrefillCancelled."""
        job.is_cancelled = True

    def stats(self) -> PrefillStats:
        """Read from other threads without a lock: each field is one read, and the
        snapshot is for reporting only."""
        counters = self.counters
        return PrefillStats(
            num_waiting=self._num_queued,
            num_running=len(self._running),
            num_computed_tokens_total=counters.num_computed_tokens_total,
            num_cached_tokens_total=counters.num_cached_tokens_total,
            num_finished_requests_total=counters.num_finished_requests_total,
        )

    def is_stalled(self, timeout_s: float) -> bool:
        """Whether the engine cannot serve: its thread died, or it has had work and
        made no progress for `timeout_s`. Safe from any thread."""
        if not self._thread.is_alive():
            return self._thread.ident is not None  # started, then died
        has_work = bool(self._running) or self._num_queued > 0
        return has_work and time.monotonic() - self.last_progress > timeout_s

    def _loop(self) -> None:
        torch.set_grad_enabled(False)
        while True:
            is_idle = not self._running
            if not self._take_new_jobs(block=is_idle):
                return
            if is_idle:
                self.last_progress = time.monotonic()
            self._drop_cancelled()
            if self._running:
                try:
                    self.step()
                except Exception as err:  # a bug must fail its requests, not the worker
                    log.exception("prefill step failed")
                    for job in self._running:
                        _resolve(job.future, error=err)
                    self._running.clear()
                self.last_progress = time.monotonic()

    def _take_new_jobs(self, block: bool) -> bool:
        """Moves queued jobs to running; False when asked to stop."""
        try:
            job = self._inbox.get(block=block)
            while True:
                if job is None:
                    return False
                with self._lock:
                    self._num_queued -= 1
                self._running.append(job)
                job = self._inbox.get_nowait()
        except queue.Empty:
            return True

    def _drop_cancelled(self) -> None:
        # A future cancelled by its awaiting handler counts as a cancelled job.
        for job in [j for j in self._running if j.is_cancelled or j.future.cancelled()]:
            self._running.remove(job)
            _resolve(job.future, error=PrefillCancelled(job.request_id))

    def step(self) -> None:
        """One forward pass: schedule chunks, run, record K/V, finish completed jobs."""
        batch, new_lens = self._schedule()
        now_ns = time.time_ns()
        for job in batch:
            job.started_ns = job.started_ns or now_ns
        input_ids = torch.tensor(
            [
                t
                for job, n in zip(batch, new_lens, strict=True)
                for t in job.token_ids[job.num_computed_tokens : job.num_computed_tokens + n]
            ],
            device=self.loaded.device,
        )
        positions = torch.cat(
            [
                torch.arange(job.num_computed_tokens, job.num_computed_tokens + n)
                for job, n in zip(batch, new_lens, strict=True)
            ]
        ).to(self.loaded.device)
        attention = ContiguousKVAttention(
            new_lens,
            [
                job.kv[:, :, : job.num_computed_tokens] if job.num_computed_tokens else None
                for job in batch
            ],
            self.kv_format if self.kv_format.is_quantized else None,
        )
        hidden = self.loaded.model(input_ids, positions, attention)
        ends = torch.tensor(new_lens).cumsum(0) - 1
        finished: list[tuple[int, PrefillJob]] = []
        for i, (job, n) in enumerate(zip(batch, new_lens, strict=True)):
            start = job.num_computed_tokens
            job.kv[:, :, start : start + n] = attention.new_kv(i)
            job.num_computed_tokens += n
            self.counters.num_computed_tokens_total += n
            if job.num_remaining_tokens == 0:
                finished.append((i, job))
        if finished:
            rows = ends[[i for i, _ in finished]].to(hidden.device)
            logits = self.loaded.model.compute_logits(hidden[rows])
            token_ids, logprobs = sample(
                logits, [j.sampling for _, j in finished], [0] * len(finished)
            )
            for (_, job), token_id, logprob in zip(finished, token_ids, logprobs, strict=True):
                self._running.remove(job)
                self.counters.num_cached_tokens_total += job.num_cached_tokens
                self.counters.num_finished_requests_total += 1
                job.finished_ns = time.time_ns()
                _resolve(job.future, result=PrefillOutput(token_id, logprob, job.kv))

    def _schedule(self) -> tuple[list[PrefillJob], list[int]]:
        """Oldest first, each job as many tokens as the budget has left."""
        batch, new_lens, budget = [], [], self.token_budget
        for job in self._running:
            if budget == 0:
                break
            n = min(job.num_remaining_tokens, budget)
            batch.append(job)
            new_lens.append(n)
            budget -= n
        return batch, new_lens


def _resolve(future: Future, result: object = None, error: BaseException | None = None) -> None:
    """Completes a future unless its waiter cancelled it (a cancelled request)."""
    with contextlib.suppress(InvalidStateError):
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
