"""The batched sampler: one token per row of logits, by the request's `SamplingParams`.

Seeded draws are reproducible across processes and batches: token `i` of a request
with seed `s` is drawn from a generator seeded by a stable digest of `(s, i)`, and
the draw only reads that request's row of logits. So the prefill worker (token 0),
a decode worker (the rest) and the local engine produce the same tokens, whatever
else shares the batch. The uniform number comes from a CPU generator and is turned
into a token by inverse CDF, so the device the logits live on does not matter either.
The parameters, their defaults and when a sequence is finished are in the torch-free
`model.sampling_params`.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from model.sampling_params import SamplingParams


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
