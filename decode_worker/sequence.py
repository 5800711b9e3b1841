"""One request's state inside the decode worker, tracked by counters.

A sequence is its token ids (prompt, then generated) and how many of them have K/V in
the pool (`num_computed_tokens`). Prefill, chunked prefill, decode and recompute after
preemption are all the same thing: the scheduler runs the next tokens until
`num_computed_tokens` catches up with `num_tokens`, then samples one more token.
`status` only says which scheduler queue holds the sequence, never which phase it is in.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from decode_worker.block_pool import BlockHash
from model.sampling_params import FinishReason


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(frozen=True)
class SequenceRequest:
    """What the decode worker is asked to continue."""

    request_id: str
    """Unique among the requests the scheduler holds."""
    prompt_token_ids: tuple[int, ...]
    """The prompt, tokenized."""
    output_token_ids: tuple[int, ...] = ()
    """Tokens already generated elsewhere (the prefill worker's first token)."""
    max_new_tokens: int = 16
    """Generated tokens at most, `output_token_ids` included."""
    stop_token_ids: frozenset[int] = frozenset()
    """Sampling one of these finishes the sequence (the token is kept)."""
    num_provided_tokens: int = 0
    """Leading tokens whose K/V the caller copies into the pool when the scheduler admits
    the request (blocks fetched from the KV store and the prefill worker's tail block),
    instead of the model computing them. At least the last token is always computed."""
    provided_start_block: int = 0
    """First block the caller holds K/V for: blocks before it were resident in the pool
    when the caller looked. If some of them were evicted by admission time, the provided
    K/V cannot be used (there would be a gap) and the tokens are recomputed instead."""
    hash_seed: BlockHash | None = None
    """Parent of the first block's hash: the fingerprint salted with the request's
    cache salt; None is the scheduler's hash function's own seed."""

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("request_id must not be empty")
        if not self.prompt_token_ids:
            raise ValueError(f"request {self.request_id}: prompt_token_ids must not be empty")
        if self.max_new_tokens <= len(self.output_token_ids):
            raise ValueError(
                f"request {self.request_id}: max_new_tokens {self.max_new_tokens} leaves nothing "
                f"to generate after {len(self.output_token_ids)} output tokens"
            )
        num_tokens = len(self.prompt_token_ids) + len(self.output_token_ids)
        if not 0 <= self.num_provided_tokens < num_tokens:
            raise ValueError(
                f"request {self.request_id}: num_provided_tokens {self.num_provided_tokens} must "
                f"be in [0, {num_tokens - 1}] so the last token is computed"
            )


@dataclass(eq=False)
class Sequence:
    """Mutable state of one admitted request; owned by the scheduler."""

    request_id: str
    token_ids: list[int]
    num_prompt_tokens: int
    max_new_tokens: int
    stop_token_ids: frozenset[int]
    arrival_index: int
    """Order of arrival; preemption takes the highest, so older requests always progress."""
    num_provided_tokens: int = 0
    """Leading tokens whose K/V the caller copies in on admission (0 after preemption:
    the copies are gone, only hash-resident blocks survive)."""
    provided_start_block: int = 0
    """See `SequenceRequest.provided_start_block`."""
    num_computed_tokens: int = 0
    """Leading tokens whose K/V is in the pool."""
    block_ids: list[int] = field(default_factory=list)
    """Physical block of each logical block of the sequence."""
    num_freed_blocks: int = 0
    """Leading blocks freed because the window moved past them (`FREED_BLOCK` in
    `block_ids`)."""
    hash_seed: BlockHash | None = None
    """See `SequenceRequest.hash_seed`."""
    block_hashes: list[BlockHash] = field(default_factory=list)
    """Hash chain of the full blocks of `token_ids` computed so far (may run ahead of
    `num_computed_tokens`: it depends only on token ids and `hash_seed`)."""
    num_hashed_blocks: int = 0
    """Leading blocks already registered in the pool under their hash."""
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None

    @classmethod
    def from_request(cls, request: SequenceRequest, arrival_index: int) -> Sequence:
        return cls(
            request_id=request.request_id,
            token_ids=[*request.prompt_token_ids, *request.output_token_ids],
            num_prompt_tokens=len(request.prompt_token_ids),
            max_new_tokens=request.max_new_tokens,
            stop_token_ids=request.stop_token_ids,
            arrival_index=arrival_index,
            num_provided_tokens=request.num_provided_tokens,
            provided_start_block=request.provided_start_block,
            hash_seed=request.hash_seed,
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_max_kv_tokens(self) -> int:
        """Tokens that can ever need K/V: the last token generated is never fed back."""
        return self.num_prompt_tokens + self.max_new_tokens - 1
