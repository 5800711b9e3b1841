"""The continuous-batching scheduler: which tokens of which sequences run each step.

One step, `schedule()`:
1. Running sequences, oldest arrival first, each get their next tokens (one for a
   decode, a chunk for a prefill that is catching up) within the step's token budget,
   plus a new block when they cross a block boundary. When no block is free, the newest
   running sequence is preempted by recompute: its blocks are freed, its counters reset,
   and it goes to the FRONT of the waiting queue. Older sequences are never preempted
   for younger ones, so the oldest request always progresses and none starves.
2. If nothing was preempted, waiting sequences are admitted in FIFO order (no skipping
   ahead, which could starve a large request) while their blocks fit and a watermark of
   free blocks remains for running sequences to grow into. Admission reuses blocks
   resident by hash, allocates the rest for the whole sequence, and lists the blocks the
   caller must fill from the KV store (`kv_fills`) before running the step.

The engine then runs the model and calls `update()` with the sampled tokens; blocks that
became full get their hash registered so later requests can share them.
`finish()`/`abort()` free a sequence's blocks; every path frees each block exactly once.

With a `window` (a model whose every layer attends to the last `window` positions
only), a running sequence's blocks that no later token can see are freed as it
advances, so it holds at most ceil(window / block_size) + 1 blocks while it decodes.
A freed block keeps its hash in the pool (a later prompt sharing the prefix may still
reuse it); its place in the sequence's table becomes `FREED_BLOCK`.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Mapping
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

from decode_worker.block_pool import BlockHash, BlockPool
from decode_worker.scheduler_output import KVFill, ScheduledSequence, SchedulerOutput
from decode_worker.sequence import Sequence, SequenceRequest, SequenceStatus
from kvstore.hashing import first_seen_block
from model.sampling_params import FinishReason, finish_reason

HashBlockFn = Callable[[BlockHash | None, SequenceOf[int]], BlockHash]
"""`hash_block(parent, token_ids)`: hash of a full block given its predecessor's hash
(for the first block, the sequence's `hash_seed`, or None for the function's own
seed). Must match the KV store's chain so fetched blocks resolve."""


FREED_BLOCK = -1
"""The block-table entry of a block freed because the window moved past it."""


class RequestTooLargeError(ValueError):
    """The request could not fit in the pool even if it ran alone."""


@dataclass(frozen=True)
class SchedulerConfig:
    """Batch limits of one decode worker."""

    max_num_seqs: int = 64
    """Running sequences at most."""
    max_num_batched_tokens: int = 512
    """Tokens computed per step, decodes and prefill chunks together; longer prompts are
    chunked. At least `max_num_seqs` keeps every running decode in every step."""
    watermark: float = 0.01
    """Fraction of the pool's blocks admission leaves free, so running sequences can
    grow without preempting each other right away."""
    enable_prefix_caching: bool = True
    """Reuse blocks resident by hash on admission (off: recompute or refetch, for
    comparisons)."""

    def __post_init__(self) -> None:
        if self.max_num_seqs <= 0:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens <= 0:
            raise ValueError(
                f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}"
            )
        if not 0.0 <= self.watermark < 1.0:
            raise ValueError(f"watermark must be in [0, 1), got {self.watermark}")


class Scheduler:
    """Continuous batching over one BlockPool. Not thread-safe: the engine thread owns it."""

    def __init__(
        self,
        config: SchedulerConfig,
        pool: BlockPool,
        hash_block: HashBlockFn,
        window: int | None = None,
    ) -> None:
        """`window`: every layer of the model attends to that many positions at most."""
        if window is not None and window < 1:
            raise ValueError(f"window must be None or >= 1, got {window}")
        self.config = config
        self.window = window
        self.pool = pool
        self._hash_block = hash_block
        self._block_size = pool.block_size
        self._num_watermark_blocks = int(config.watermark * pool.num_blocks)
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._running: list[Sequence] = []  # sorted by arrival_index
        self._sequences: dict[str, Sequence] = {}
        self._num_arrived = 0
        # (sequence, tokens scheduled) of the step awaiting update(); None when idle.
        self._in_flight: list[tuple[Sequence, int, bool]] | None = None
        # Blocks that became full because the model computed them (not ones copied in
        # or found resident), since the last `take_computed_blocks`.
        self._computed_blocks: list[tuple[BlockHash, int]] = []

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def has_unfinished(self) -> bool:
        return bool(self._sequences)

    def get(self, request_id: str) -> Sequence | None:
        return self._sequences.get(request_id)

    def add_request(self, request: SequenceRequest) -> Sequence:
        """Queue a request at the back of the waiting queue. Raises RequestTooLargeError if
        its longest possible sequence could not fit in the pool alone (waiting would
        deadlock), ValueError if the id is already in use."""
        if request.request_id in self._sequences:
            raise ValueError(f"request id {request.request_id!r} is already scheduled")
        seq = Sequence.from_request(request, arrival_index=self._num_arrived)
        num_blocks = -(-seq.num_max_kv_tokens // self._block_size)
        num_admissible_blocks = self.pool.num_blocks - self._num_watermark_blocks
        if num_blocks > num_admissible_blocks:
            raise RequestTooLargeError(
                f"request {request.request_id}: {seq.num_prompt_tokens} prompt tokens + "
                f"{seq.max_new_tokens} new tokens need {num_blocks} blocks of "
                f"{self._block_size} tokens, the pool admits at most {num_admissible_blocks}; "
                "lower max_new_tokens or shorten the prompt"
            )
        self._num_arrived += 1
        self._sequences[seq.request_id] = seq
        self._waiting.append(seq)
        return seq

    def schedule(self) -> SchedulerOutput:
        assert self._in_flight is None, "schedule() called again before update()"
        budget = self.config.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        preempted: list[str] = []
        idx = 0
        while idx < len(self._running) and budget > 0:
            seq = self._running[idx]
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            num_new_blocks = self._num_blocks(seq.num_computed_tokens + num_new) - len(
                seq.block_ids
            )
            while num_new_blocks > self.pool.num_free_blocks:
                victim = self._running[-1]  # the newest arrival
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it preempted itself, and it was the newest: nothing follows
            seq.block_ids.extend(self.pool.allocate(max(num_new_blocks, 0)))
            scheduled.append((seq, num_new))
            budget -= num_new
            idx += 1

        kv_fills: list[KVFill] = []
        while not preempted and self._waiting and budget > 0:
            if len(self._running) >= self.config.max_num_seqs:
                break
            if not self._admit(self._waiting[0], kv_fills):
                break
            seq = self._waiting.popleft()
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            scheduled.append((seq, num_new))
            budget -= num_new

        entries = [self._entry(seq, num_new) for seq, num_new in scheduled]
        self._in_flight = [
            (seq, n, e.is_sampled) for (seq, n), e in zip(scheduled, entries, strict=True)
        ]
        return SchedulerOutput(
            decodes=tuple(e for e in entries if e.num_tokens == 1),
            prefills=tuple(e for e in entries if e.num_tokens > 1),
            kv_fills=tuple(kv_fills),
            preempted_request_ids=tuple(preempted),
        )

    def update(self, sampled_token_ids: Mapping[str, int]) -> list[Sequence]:
        """Record that the last step ran: advance counters, register newly full blocks,
        append each sampled token and finish sequences that hit a stop token or their
        length. Sequences aborted since `schedule()` are skipped. Returns the finished."""
        assert self._in_flight is not None, "update() called without a scheduled step"
        in_flight, self._in_flight = self._in_flight, None
        finished = []
        for seq, num_new, is_sampled in in_flight:
            if seq.status is not SequenceStatus.RUNNING:
                continue
            seq.num_computed_tokens += num_new
            self._register_full_blocks(seq, is_computed=True)
            self._free_blocks_behind_window(seq)
            if not is_sampled:
                continue
            token_id = sampled_token_ids[seq.request_id]
            seq.token_ids.append(token_id)
            reason = finish_reason(
                token_id, seq.num_output_tokens, seq.stop_token_ids, seq.max_new_tokens
            )
            if reason is not None:
                self._finish(seq, reason)
                finished.append(seq)
        return finished

    def finish(self, request_id: str, reason: FinishReason) -> bool:
        """Finish a waiting or running request (a stop string, a cancel) and free its
        blocks. Returns False if the id is unknown or already finished."""
        seq = self._sequences.get(request_id)
        if seq is None:
            return False
        self._finish(seq, reason)
        return True

    def abort(self, request_id: str) -> bool:
        return self.finish(request_id, FinishReason.ABORT)

    def _admit(self, seq: Sequence, kv_fills: list[KVFill]) -> bool:
        """Give `seq` its blocks if they fit above the watermark; report the blocks the
        caller fills. Returns False, changing nothing, if they do not fit."""
        block_size = self._block_size
        hashes = self._full_block_hashes(seq)
        # The last token is always computed (its logits are sampled), so its block is
        # never taken from the cache, even if full and resident.
        num_reusable = (seq.num_tokens - 1) // block_size
        first, num_resident = self._window_start(seq, hashes, num_reusable)
        if first == 0:
            num_resident = (
                self.pool.lookup_prefix(hashes[:num_reusable])
                if self.config.enable_prefix_caching
                else 0
            )
            if num_resident < seq.provided_start_block:
                # Blocks between the resident prefix and the provided ones were evicted
                # since the caller looked: the provided K/V would leave a gap, so
                # recompute instead.
                seq.num_provided_tokens = 0
        end = first + num_resident
        resident_hashes = hashes[first:end]
        num_reclaimed = sum(
            self.pool.ref_count(self.pool.cached_block(h)) == 0 for h in resident_hashes
        )
        num_new_blocks = self._num_blocks(seq.num_tokens) - end
        num_free_after = self.pool.num_free_blocks - num_reclaimed - num_new_blocks
        if num_free_after < self._num_watermark_blocks:
            return False
        # Blocks before the window's first are never allocated (`FREED_BLOCK`).
        seq.block_ids = [FREED_BLOCK] * first + self.pool.acquire_cached(resident_hashes)
        seq.block_ids.extend(self.pool.allocate(num_new_blocks))
        seq.num_freed_blocks = first
        seq.num_hashed_blocks = end
        seq.num_computed_tokens = max(end * block_size, seq.num_provided_tokens)
        for idx in range(end, self._num_blocks(seq.num_provided_tokens)):
            num_tokens = min(block_size, seq.num_provided_tokens - idx * block_size)
            kv_fills.append(KVFill(seq.request_id, seq.block_ids[idx], idx, num_tokens))
        # Provided blocks count as computed now: the caller fills them before the model
        # runs, so registering their hashes is safe even for requests admitted later in
        # this same step.
        self._register_full_blocks(seq)
        seq.status = SequenceStatus.RUNNING
        self._running.append(seq)
        self._running.sort(key=lambda s: s.arrival_index)
        return True

    def _window_start(
        self, seq: Sequence, hashes: list[BlockHash], num_reusable: int
    ) -> tuple[int, int]:
        """(first, resident): with a window, the blocks before `first` need no place in
        the pool when every token left to compute sees past them, the K/V from
        `first` on being resident (`resident` blocks) or provided without a gap;
        else (0, 0) and admission takes the whole prefix as without a window."""
        if self.window is None:
            return 0, 0
        block_size = self._block_size
        first = min(first_seen_block(seq.num_tokens - 1, self.window, block_size), num_reusable)
        if first == 0:
            return 0, 0
        num_resident = (
            self.pool.lookup_prefix(hashes[first:num_reusable])
            if self.config.enable_prefix_caching
            else 0
        )
        if seq.num_provided_tokens and first + num_resident < seq.provided_start_block:
            return 0, 0  # a gap before the provided K/V
        next_position = max((first + num_resident) * block_size, seq.num_provided_tokens)
        if first_seen_block(next_position, self.window, block_size) < first:
            return 0, 0  # a token left to compute sees a block before `first`
        return first, num_resident

    def _free_blocks_behind_window(self, seq: Sequence) -> None:
        """Frees the full blocks that every later token's window starts after: the next
        token, at position `num_computed_tokens`, sees positions from that less
        `window` - 1 on. Hashed blocks are freed (their copies stay reusable)."""
        if self.window is None:
            return
        first_seen = seq.num_computed_tokens - self.window + 1
        num_behind = min(max(first_seen, 0) // self._block_size, seq.num_hashed_blocks)
        for idx in range(seq.num_freed_blocks, num_behind):
            self.pool.free([seq.block_ids[idx]])
            seq.block_ids[idx] = FREED_BLOCK
        seq.num_freed_blocks = max(seq.num_freed_blocks, num_behind)

    def _release_blocks(self, seq: Sequence) -> None:
        # Last block first, so the pool evicts a sequence's tail before its prefix.
        self.pool.free([b for b in seq.block_ids[::-1] if b != FREED_BLOCK])
        seq.block_ids = []
        seq.num_freed_blocks = 0

    def _preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and send it to the front of the waiting queue to be
        recomputed; the caller's provided K/V is gone, only hash-resident blocks survive."""
        self._release_blocks(seq)
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.num_provided_tokens = 0
        seq.status = SequenceStatus.WAITING
        self._running.remove(seq)
        self._waiting.appendleft(seq)

    def _finish(self, seq: Sequence, reason: FinishReason) -> None:
        if seq.status is SequenceStatus.RUNNING:
            self._running.remove(seq)
        else:
            self._waiting.remove(seq)
        self._release_blocks(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        del self._sequences[seq.request_id]

    def take_computed_blocks(self) -> list[tuple[BlockHash, int]]:
        """(hash, block id) of each block the model filled since the last call, in
        order; each is a new copy the pool now holds under its hash, so the caller can
        read (and publish) it before the next step changes the pool."""
        blocks, self._computed_blocks = self._computed_blocks, []
        return blocks

    def _register_full_blocks(self, seq: Sequence, is_computed: bool = False) -> None:
        hashes = self._full_block_hashes(seq)
        num_full = seq.num_computed_tokens // self._block_size
        for idx in range(seq.num_hashed_blocks, num_full):
            is_new = self.pool.register_hash(seq.block_ids[idx], hashes[idx])
            if is_new and is_computed:
                self._computed_blocks.append((hashes[idx], seq.block_ids[idx]))
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, num_full)

    def _full_block_hashes(self, seq: Sequence) -> list[BlockHash]:
        """Extend the sequence's hash chain to all its full blocks (cached on `seq`)."""
        block_size = self._block_size
        for idx in range(len(seq.block_hashes), seq.num_tokens // block_size):
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.hash_seed
            tokens = seq.token_ids[idx * block_size : (idx + 1) * block_size]
            seq.block_hashes.append(self._hash_block(parent, tokens))
        return seq.block_hashes

    def _num_blocks(self, num_tokens: int) -> int:
        return -(-num_tokens // self._block_size)

    def _entry(self, seq: Sequence, num_new: int) -> ScheduledSequence:
        start = seq.num_computed_tokens
        positions = range(start, start + num_new)
        return ScheduledSequence(
            request_id=seq.request_id,
            token_ids=tuple(seq.token_ids[start : start + num_new]),
            start_pos=start,
            # A freed block's entry points at block 0: before the window, never attended.
            block_table=tuple(max(b, 0) for b in seq.block_ids),
            slot_mapping=tuple(
                seq.block_ids[p // self._block_size] * self._block_size + p % self._block_size
                for p in positions
            ),
            is_sampled=start + num_new == seq.num_tokens,
        )
