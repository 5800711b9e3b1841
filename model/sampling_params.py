"""Sampling parameters, their defaults, the finish reasons, and when a sequence is
finished: the rules every path (local engine, colocated, disaggregated) shares.

This module must not import torch: the router validates requests with it.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Collection
from dataclasses import dataclass

DEFAULT_MAX_TOKENS = 16
"""Output tokens when a request does not say."""

GREEDY_TEMPERATURE = 1e-5
"""Temperatures below this are greedy. Dividing logits by a tinier one overflows the
softmax (1e-38 turned every logit into inf and sampled the last vocabulary id)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each output token and when to stop."""

    max_tokens: int = DEFAULT_MAX_TOKENS
    """Most output tokens to generate (the finish reason is `length` when reached)."""
    temperature: float = 0.0
    """Below `GREEDY_TEMPERATURE` (0 included) greedy (argmax); otherwise logits are
    divided by it before softmax."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of top tokens whose mass reaches top_p."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 means off. top_k=1 is greedy."""
    seed: int | None = None
    """Makes sampling reproducible: token i depends only on (seed, i, the logits)."""
    stop: tuple[str, ...] = ()
    """Stop strings: generation ends when the text contains one (matched on text)."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation ends after any of these tokens (even with ignore_eos)."""
    ignore_eos: bool = False
    """Keep generating past the model's EOS tokens (benchmarks want fixed lengths)."""
    logprobs: bool = False
    """Report the log-probability of each sampled token."""

    def __post_init__(self) -> None:
        # Accept lists from callers; the stored value is always a tuple (hashable, frozen).
        object.__setattr__(self, "stop", tuple(self.stop))
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        # Messages name the field; the router prefixes `sampling.` for its clients.
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(
                f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:  # also refuses NaN
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        for i, stop in enumerate(self.stop):
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop[{i}] is empty; remove it")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")

    @property
    def is_greedy(self) -> bool:
        """Argmax: a temperature too small to divide logits by safely, or top_k 1."""
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1


class FinishReason(enum.Enum):
    STOP = "stop"
    """A stop token, EOS or a stop string."""
    LENGTH = "length"
    """max_tokens reached."""
    ABORT = "abort"
    """Cancelled by the client, a deadline, or the worker giving up; never sent as a
    finish reason (the call ends with a gRPC status instead)."""


def stop_token_set(params: SamplingParams, eos_token_ids: Collection[int]) -> frozenset[int]:
    """The token ids that end a request: its `stop_token_ids`, and the model's EOS
    tokens unless it ignores them."""
    eos = () if params.ignore_eos else eos_token_ids
    return frozenset((*params.stop_token_ids, *eos))


def finish_reason(
    token_id: int, num_output_tokens: int, stop_token_ids: Collection[int], max_tokens: int
) -> FinishReason | None:
    """Whether a sequence ends after emitting `token_id` as its `num_output_tokens`-th
    output token (`stop_token_ids` from `stop_token_set`; stop strings are matched on
    text, by `final_finish_reason`). A stop token wins over LENGTH on the same token."""
    if token_id in stop_token_ids:
        return FinishReason.STOP
    if num_output_tokens >= max_tokens:
        return FinishReason.LENGTH
    return None


def final_finish_reason(
    token_reason: FinishReason | None, is_stop_string_matched: bool
) -> FinishReason | None:
    """The reason a request reports, given the token-level reason (`finish_reason`)
    and whether a stop string matched the text: a match wins over LENGTH (and over
    not being finished), as in vLLM, wherever the text is matched."""
    return FinishReason.STOP if is_stop_string_matched else token_reason
