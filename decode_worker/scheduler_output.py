"""What the scheduler hands the engine for one step: the tokens each sequence runs,
where their K/V goes, and the blocks to fill from the store first."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScheduledSequence:
    """The tokens of one sequence that the model computes this step."""

    request_id: str
    token_ids: tuple[int, ...]
    """Tokens to run, at positions `start_pos, start_pos + 1, ...`."""
    start_pos: int
    """Position of the first token; tokens before it already have K/V in the pool."""
    block_table: tuple[int, ...]
    """Physical block of each logical block of the sequence."""
    slot_mapping: tuple[int, ...]
    """Slot (`block_id * block_size + offset`) where each token's K/V goes."""
    is_sampled: bool
    """The chunk reaches the sequence's last token: sample from its last position."""

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def context_len(self) -> int:
        """Tokens attended by the last token of the chunk, itself included."""
        return self.start_pos + len(self.token_ids)


@dataclass(frozen=True)
class KVFill:
    """A block the caller must copy into the pool before running the step."""

    request_id: str
    block_id: int
    """Destination block in the pool."""
    logical_block_idx: int
    """Which block of the sequence: tokens `[idx * block_size, idx * block_size + num_tokens)`."""
    num_tokens: int
    """Valid tokens: `block_size` for a full block, fewer for the prefill worker's tail."""


@dataclass(frozen=True)
class SchedulerOutput:
    """Everything the model runner needs for one step."""

    decodes: tuple[ScheduledSequence, ...]
    """Sequences computing exactly one token (paged attention)."""
    prefills: tuple[ScheduledSequence, ...]
    """Sequences computing a chunk of several tokens."""
    kv_fills: tuple[KVFill, ...]
    """Blocks to copy in (store payloads, tails) before the model runs."""
    preempted_request_ids: tuple[str, ...]
    """Sequences sent back to the waiting queue this step."""

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(s.num_tokens for s in self.decodes) + sum(s.num_tokens for s in self.prefills)

    @property
    def is_empty(self) -> bool:
        return not self.decodes and not self.prefills
