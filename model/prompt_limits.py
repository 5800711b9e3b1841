"""`check_prompt`: whether a tokenized prompt fits the served model. The one rule
every service applies (the router before routing, each worker before it computes).

This module must not import torch: the router uses it.
"""

from __future__ import annotations

from collections.abc import Sequence


class InvalidPrompt(ValueError):
    """A prompt the model cannot take; the message names the field and the limit."""


def check_prompt(
    token_ids: Sequence[int],
    max_tokens: int,
    *,
    vocab_size: int,
    max_context_len: int,
    field: str = "prompt_token_ids",
) -> None:
    """Raises InvalidPrompt unless `token_ids` is non-empty, every id is in
    `[0, vocab_size)`, and the prompt plus `max_tokens` new tokens fits the context.
    `field` is what the caller sent (`prompt` for text), for the message."""
    if not token_ids:
        raise InvalidPrompt(f"{field} encodes to no tokens; send a non-empty prompt")
    check_token_ids(token_ids, vocab_size, "prompt_token_ids")
    if len(token_ids) + max_tokens > max_context_len:
        raise InvalidPrompt(
            f"{field} has {len(token_ids)} tokens and sampling.max_tokens is {max_tokens}: "
            f"together over the model's context of {max_context_len} tokens; "
            "shorten the prompt or lower max_tokens"
        )


def check_token_ids(token_ids: Sequence[int], vocab_size: int, field: str) -> None:
    """Raises InvalidPrompt unless every id of `field` is in `[0, vocab_size)`."""
    for i, token_id in enumerate(token_ids):
        check_token_id(token_id, vocab_size, f"{field}[{i}]")


def check_token_id(token_id: int, vocab_size: int, field: str) -> None:
    """Raises InvalidPrompt, naming `field`, unless `token_id` is in `[0, vocab_size)`:
    an id past the vocabulary would index past the embedding table."""
    if not 0 <= token_id < vocab_size:
        raise InvalidPrompt(
            f"{field} is {token_id}; token ids must be in [0, {vocab_size}), the vocabulary size"
        )
