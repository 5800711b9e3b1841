"""Sampling parameters, the batched sampler, and when a sequence is finished.

Seeded draws are reproducible across processes and batches: token `i` of a request
with seed `s` is drawn from a generator seeded by a stable digest of `(s, i)`, and
the draw only reads that request's row of logits. So the prefill worker (token 0),
a decode worker (the rest) and the local engine produce the same tokens, whatever
else shares the batch. The uniform number comes from a CPU generator and is turned
into a token by inverse CDF, so the device the logits live on does not matter either.
"""

from __future__ import annotations

import enum
import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each output token and when to stop."""

    max_tokens: int = 16
    """Most output tokens to generate (the finish reason is `length` when reached)."""
    temperature: float = 0.0
    """0 means greedy (argmax); otherwise logits are divided by it before softmax."""
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
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError("stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError("stop_token_ids must be non-negative integers")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class FinishReason(enum.Enum):
    STOP = "stop"
    """A stop token, EOS or a stop string."""
    LENGTH = "length"
    """max_tokens reached."""
    ABORT = "abort"
    """Cancelled by the client, a deadline, or the worker giving up; never sent as a
    finish reason (the call ends with a gRPC status instead)."""


def finish_reason(
    token_id: int,
    num_output_tokens: int,
    params: SamplingParams,
    eos_token_ids: Sequence[int],
) -> FinishReason | None:
    """Whether the sequence ends after emitting `token_id` as its
    `num_output_tokens`-th output token (stop strings are matched elsewhere, on text)."""
    if token_id in params.stop_token_ids:
        return FinishReason.STOP
    if not params.ignore_eos and token_id in eos_token_ids:
        return FinishReason.STOP
    if num_output_tokens >= params.max_tokens:
        return FinishReason.LENGTH
    return None


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    output_indices: Sequence[int],
) -> tuple[list[int], list[float]]:
    """Pick one token per row of `logits` [batch, vocab] (float32).

    `output_indices[b]` is which output token of its request row b is (0 for the
    first). Returns the token ids and, per row, the log-probability of the sampled
    token under the raw model distribution (log-softmax of the logits before
    temperature, top-k or top-p, as vLLM reports by default).
    """
    if not (logits.dim() == 2 and logits.shape[0] == len(params) == len(output_indices)):
        raise ValueError(
            f"logits {tuple(logits.shape)} need one row per params ({len(params)}) "
            f"and output index ({len(output_indices)})"
        )
    logits = logits.float()
    token_ids = logits.argmax(dim=-1).tolist()
    for row, (p, output_idx) in enumerate(zip(params, output_indices, strict=True)):
        if not p.is_greedy:
            token_ids[row] = _sample_row(logits[row], p, output_idx)
    if not any(p.logprobs for p in params):
        return token_ids, [0.0] * len(token_ids)
    chosen = torch.tensor(token_ids, device=logits.device)[:, None]
    logprobs = torch.log_softmax(logits, dim=-1).gather(1, chosen)[:, 0].tolist()
    return token_ids, logprobs


def _sample_row(logits: torch.Tensor, params: SamplingParams, output_idx: int) -> int:
    probs = filtered_probs(logits, params)
    if params.seed is None:
        uniform = torch.rand((), dtype=torch.float64).item()
    else:
        generator = torch.Generator().manual_seed(draw_seed(params.seed, output_idx))
        uniform = torch.rand((), generator=generator, dtype=torch.float64).item()
    # Inverse CDF: the first token whose cumulative mass exceeds the uniform draw.
    # Zero-probability (filtered) tokens never qualify: their cdf equals the one before.
    cdf = probs.double().cumsum(0)
    target = torch.tensor([uniform * cdf[-1].item()], dtype=torch.float64, device=cdf.device)
    token_id = int(torch.searchsorted(cdf, target, right=True).item())
    return min(token_id, probs.shape[0] - 1)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a non-greedy row draws from: temperature, then top-k, then top-p."""
    scaled = logits.float() / params.temperature
    if 0 < params.top_k < scaled.shape[-1]:
        kth_largest = torch.topk(scaled, params.top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth_largest, -math.inf)
    probs = torch.softmax(scaled, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        mass_before = sorted_probs.cumsum(0) - sorted_probs
        # Keep a token while the mass of the tokens above it is still short of top_p;
        # the most likely token is always kept.
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def draw_seed(seed: int, output_idx: int) -> int:
    """The generator seed for output token `output_idx` of a request seeded with `seed`."""
    digest = hashlib.sha256(f"kvrelay-sample/{seed}/{output_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
