"""Greedy runs for parity tests: ours through the decode engine, transformers' by argmax."""

from __future__ import annotations

import torch

from model.sampling_params import SamplingParams


def engine_greedy(loaded, prompt: list[int], params: SamplingParams) -> list[int]:
    """What `kvrelay generate --local` runs: the decode engine, one continuous batch."""
    from decode_worker.batch_generate import generate_with_engine

    return [out.token_id for _, out in generate_with_engine(loaded, [prompt], params)]


@torch.inference_mode()
def hf_greedy(model, prompt: list[int], num_tokens: int) -> list[int]:
    """Argmax of each next token, EOS included (as `ignore_eos` does: no stop, and
    unlike `min_new_tokens` no EOS suppressed)."""
    ids = list(prompt)
    past = None
    step = torch.tensor([ids])
    for _ in range(num_tokens):
        out = model(step, past_key_values=past, use_cache=True)
        past = out.past_key_values
        ids.append(int(out.logits[0, -1].argmax()))
        step = torch.tensor([[ids[-1]]])
    return ids[len(prompt) :]
