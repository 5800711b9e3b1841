"""Checks a GenerateRequest against the model and the router's limits.

Plain functions over protos, so they are tested without a server. Every refusal
is an `InvalidRequest` whose message names the field and says what to change;
the servicer turns it into `INVALID_ARGUMENT`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protos import generator_pb2 as pb

DEFAULT_MAX_TOKENS = 16


class InvalidRequest(ValueError):
    """A request the router refuses; the message is sent to the client as is."""


@dataclass(frozen=True)
class RequestLimits:
    """What the router accepts. Defaults follow common serving stacks."""

    max_tokens: int = 4096
    """Largest `sampling.max_tokens` a request may ask for."""
    max_stop_strings: int = 16
    """Most entries in `sampling.stop`."""
    max_stop_bytes: int = 256
    """Longest stop string, in UTF-8 bytes."""
    max_request_bytes: int = 1024 * 1024
    """Largest serialized request."""

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_stop_strings", "max_stop_bytes", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"RequestLimits.{name} must be >= 1")


@dataclass(frozen=True)
class ModelLimits:
    """What the served model accepts."""

    vocab_size: int
    max_context_len: int


def validate_sampling(sampling: pb.SamplingParams, limits: RequestLimits) -> pb.SamplingParams:
    """Checks sampling fields and returns a copy with every default filled in."""
    max_tokens = sampling.max_tokens if sampling.HasField("max_tokens") else DEFAULT_MAX_TOKENS
    if max_tokens == 0:
        raise InvalidRequest("sampling.max_tokens must be at least 1")
    if max_tokens > limits.max_tokens:
        raise InvalidRequest(
            f"sampling.max_tokens is {max_tokens}; this server allows at most {limits.max_tokens}"
        )
    if not math.isfinite(sampling.temperature) or sampling.temperature < 0:
        raise InvalidRequest(
            f"sampling.temperature must be a finite number >= 0 (0 is greedy), got {sampling.temperature}"
        )
    top_p = sampling.top_p if sampling.HasField("top_p") else 1.0
    if not (0.0 < top_p <= 1.0):  # also refuses NaN
        raise InvalidRequest(f"sampling.top_p must be in (0, 1], got {top_p}")
    if sampling.top_k < 0:
        raise InvalidRequest(f"sampling.top_k must be >= 0 (0 turns it off), got {sampling.top_k}")
    if len(sampling.stop) > limits.max_stop_strings:
        raise InvalidRequest(
            f"sampling.stop has {len(sampling.stop)} strings; at most {limits.max_stop_strings} are allowed"
        )
    for i, stop in enumerate(sampling.stop):
        if not stop:
            raise InvalidRequest(f"sampling.stop[{i}] is empty; remove it")
        if len(stop.encode()) > limits.max_stop_bytes:
            raise InvalidRequest(
                f"sampling.stop[{i}] is {len(stop.encode())} bytes; the limit is {limits.max_stop_bytes}"
            )
    normalized = pb.SamplingParams()
    normalized.CopyFrom(sampling)
    normalized.max_tokens = max_tokens
    normalized.top_p = top_p
    return normalized


def validate_prompt_shape(request: pb.GenerateRequest, limits: RequestLimits) -> None:
    """Checks size and that exactly one of prompt / prompt_token_ids is set."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidRequest(
            f"request is {size} bytes; the limit is {limits.max_request_bytes}; send a shorter prompt"
        )
    has_text, has_ids = bool(request.prompt), bool(request.prompt_token_ids)
    if has_text and has_ids:
        raise InvalidRequest("set only one of prompt and prompt_token_ids, not both")
    if not has_text and not has_ids:
        raise InvalidRequest("prompt is empty: set prompt (text) or prompt_token_ids")


def validate_prompt_tokens(
    token_ids: list[int], max_tokens: int, model: ModelLimits, field: str
) -> None:
    """Checks token ids against the vocabulary and the context length."""
    if not token_ids:
        raise InvalidRequest(f"{field} encodes to no tokens; send a non-empty prompt")
    for i, token_id in enumerate(token_ids):
        if token_id >= model.vocab_size:
            raise InvalidRequest(
                f"prompt_token_ids[{i}] is {token_id}; token ids must be below the vocabulary size {model.vocab_size}"
            )
    if len(token_ids) + max_tokens > model.max_context_len:
        raise InvalidRequest(
            f"{field} has {len(token_ids)} tokens and sampling.max_tokens is {max_tokens}: "
            f"together over the model's context of {model.max_context_len} tokens; "
            "shorten the prompt or lower max_tokens"
        )
