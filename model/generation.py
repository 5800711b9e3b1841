"""A simple reference generation loop over `ContiguousKVAttention`.

Prefill all prompts in one flattened forward pass, then decode one token per
running sequence per step, each continuing from its own contiguous K/V. It is the
yardstick for parity tests; serving and `kvrelay generate --local` run on the
decode engine (paged KV, continuous batching) in `decode_worker/`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

from model.attention import ContiguousKVAttention
from model.loader import LoadedModel
from model.sampling import sample
from model.sampling_params import FinishReason, SamplingParams, finish_reason, stop_token_set


@dataclass(frozen=True)
class TokenEvent:
    """One generated token of one sequence."""

    seq_idx: int
    """Which prompt (index into the batch) it belongs to."""
    token_id: int
    logprob: float
    """log-probability under the raw model distribution (0.0 unless params.logprobs)."""
    finish_reason: FinishReason | None
    """Set on the sequence's last token."""


@dataclass
class GenerationResult:
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: FinishReason | None = None


@dataclass
class _Sequence:
    """A running sequence: its K/V so far and the token it will feed next."""

    seq_idx: int
    params: SamplingParams
    kv: torch.Tensor  # [num_layers, 2, num_tokens_cached, num_kv_heads, head_dim]
    next_token_id: int
    num_output_tokens: int


@torch.inference_mode()
def generate_stream(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
) -> Iterator[TokenEvent]:
    """Generate for a batch of token-id prompts, yielding tokens as they are sampled."""
    params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    _validate(loaded, prompts, params_list)
    eos_ids = loaded.config.eos_token_ids
    device = loaded.device

    # Prefill: every prompt in one forward pass.
    prompt_lens = [len(p) for p in prompts]
    input_ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=device)
    positions = torch.cat([torch.arange(n, device=device) for n in prompt_lens])
    attention = ContiguousKVAttention(prompt_lens)
    hidden = loaded.model(input_ids, positions, attention)
    last_rows = torch.tensor(prompt_lens, device=device).cumsum(0) - 1
    logits = loaded.model.compute_logits(hidden[last_rows])
    token_ids, logprobs = sample(logits, params_list, [0] * len(prompts))

    running: list[_Sequence] = []
    for i, (token_id, logprob) in enumerate(zip(token_ids, logprobs, strict=True)):
        p = params_list[i]
        reason = finish_reason(token_id, 1, stop_token_set(p, eos_ids), p.max_tokens)
        yield TokenEvent(i, token_id, logprob, reason)
        if reason is None:
            running.append(_Sequence(i, params_list[i], attention.new_kv(i), token_id, 1))

    # Decode: one token per running sequence per step.
    while running:
        input_ids = torch.tensor([s.next_token_id for s in running], device=device)
        positions = torch.tensor([s.kv.shape[2] for s in running], device=device)
        attention = ContiguousKVAttention([1] * len(running), [s.kv for s in running])
        hidden = loaded.model(input_ids, positions, attention)
        logits = loaded.model.compute_logits(hidden)
        token_ids, logprobs = sample(
            logits, [s.params for s in running], [s.num_output_tokens for s in running]
        )
        still_running = []
        for row, seq in enumerate(running):
            seq.num_output_tokens += 1
            reason = finish_reason(
                token_ids[row],
                seq.num_output_tokens,
                stop_token_set(seq.params, eos_ids),
                seq.params.max_tokens,
            )
            yield TokenEvent(seq.seq_idx, token_ids[row], logprobs[row], reason)
            if reason is None:
                seq.kv = torch.cat((seq.kv, attention.new_kv(row)), dim=2)
                seq.next_token_id = token_ids[row]
                still_running.append(seq)
        running = still_running


def generate(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams | Sequence[SamplingParams],
) -> list[GenerationResult]:
    """`generate_stream`, collected per prompt."""
    results = [GenerationResult() for _ in prompts]
    for event in generate_stream(loaded, prompts, params):
        result = results[event.seq_idx]
        result.token_ids.append(event.token_id)
        result.logprobs.append(event.logprob)
        result.finish_reason = event.finish_reason
    return results


def _validate(
    loaded: LoadedModel, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
) -> None:
    if len(params) != len(prompts):
        raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
    config = loaded.config
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        if not prompt:
            raise ValueError(f"prompt {i} is empty")
        if any(not 0 <= t < config.vocab_size for t in prompt):
            raise ValueError(f"prompt {i} has token ids outside [0, {config.vocab_size})")
        if len(prompt) + p.max_tokens > config.max_position_embeddings:
            raise ValueError(
                f"prompt {i}: {len(prompt)} prompt tokens + max_tokens {p.max_tokens} exceed "
                f"the model's {config.max_position_embeddings} positions"
            )
