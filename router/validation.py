"""What the router checks of a GenerateRequest before it routes it: the shape of
the request and its own limits. The sampling rules themselves are
`model.sampling_params`'s and the prompt rule `model.prompt_limits`'s, which every
service applies alike.

Plain functions over protos, so they are tested without a server. Every refusal
is an `InvalidRequest` whose message names the field and says what to change;
the servicer turns it into `INVALID_ARGUMENT`.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.sampling_params import SamplingParams
from protos import generator_pb2 as pb
from rpc.sampling_proto import sampling_from_proto


class InvalidRequest(ValueError):
    """A request the router refuses; the message is sent to the client as is."""


@dataclass(frozen=True)
class RequestLimits:
    """What this router accepts, beyond what the model accepts. Defaults follow
    common serving stacks."""

    max_tokens: int = 4096
    """Largest `sampling.max_tokens` a request may ask for."""
    max_stop_strings: int = 16
    """Most entries in `sampling.stop`."""
    max_stop_bytes: int = 256
    """Longest stop string, in UTF-8 bytes."""
    max_stop_token_ids: int = 64
    """Most entries in `sampling.stop_token_ids` (each worker checks every sampled
    token against them)."""
    max_request_bytes: int = 1024 * 1024
    """Largest serialized request."""
    max_prompt_bytes: int = 256 * 1024
    """Longest prompt text, in UTF-8 bytes: `prompt`, or every message's role and
    content together. Checked before tokenizing, so a text no context could hold
    costs no tokenizer pass; 256 KiB is about 64k tokens at 4 bytes a token."""

    def __post_init__(self) -> None:
        for name in (
            "max_tokens",
            "max_stop_strings",
            "max_stop_bytes",
            "max_stop_token_ids",
            "max_request_bytes",
            "max_prompt_bytes",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"RequestLimits.{name} must be >= 1")


def validate_sampling(sampling: pb.SamplingParams, limits: RequestLimits) -> SamplingParams:
    """The request's `SamplingParams`, every default filled in, within this router's
    limits. Raises InvalidRequest."""
    try:
        params = sampling_from_proto(sampling)
    except ValueError as err:
        raise InvalidRequest(f"sampling.{err}") from None
    if params.max_tokens > limits.max_tokens:
        raise InvalidRequest(
            f"sampling.max_tokens is {params.max_tokens}; this server allows at most "
            f"{limits.max_tokens}"
        )
    if len(params.stop) > limits.max_stop_strings:
        raise InvalidRequest(
            f"sampling.stop has {len(params.stop)} strings; at most "
            f"{limits.max_stop_strings} are allowed"
        )
    for i, stop in enumerate(params.stop):
        if len(stop.encode()) > limits.max_stop_bytes:
            raise InvalidRequest(
                f"sampling.stop[{i}] is {len(stop.encode())} bytes; the limit is "
                f"{limits.max_stop_bytes}"
            )
    if len(params.stop_token_ids) > limits.max_stop_token_ids:
        raise InvalidRequest(
            f"sampling.stop_token_ids has {len(params.stop_token_ids)} ids; at most "
            f"{limits.max_stop_token_ids} are allowed"
        )
    return params


def validate_prompt_shape(request: pb.GenerateRequest, limits: RequestLimits) -> None:
    """Checks size (of the request, and of the prompt's text), that exactly one of
    prompt / prompt_token_ids / messages is set, and that every message has a role.
    Cheap, and run before anything is rendered or tokenized."""
    size = request.ByteSize()
    if size > limits.max_request_bytes:
        raise InvalidRequest(
            f"request is {size} bytes; the limit is {limits.max_request_bytes}; send a shorter prompt"
        )
    num_text_bytes = len(request.prompt.encode()) + sum(
        len(m.role.encode()) + len(m.content.encode()) for m in request.messages
    )
    if num_text_bytes > limits.max_prompt_bytes:
        field = "messages hold" if request.messages else "prompt is"
        raise InvalidRequest(
            f"{field} {num_text_bytes} bytes of text; the limit is {limits.max_prompt_bytes} "
            "(checked before tokenizing); send a shorter prompt"
        )
    given = [
        name
        for name, is_set in (
            ("prompt", bool(request.prompt)),
            ("prompt_token_ids", bool(request.prompt_token_ids)),
            ("messages", bool(request.messages)),
        )
        if is_set
    ]
    if len(given) > 1:
        raise InvalidRequest(
            f"set only one of prompt, prompt_token_ids and messages, not {' and '.join(given)}"
        )
    if not given:
        raise InvalidRequest(
            "prompt is empty: set prompt (text), prompt_token_ids or messages (a conversation)"
        )
    if request.HasField("add_generation_prompt") and not request.messages:
        raise InvalidRequest("add_generation_prompt applies to messages only: unset it")
    for i, message in enumerate(request.messages):
        if not message.role:
            raise InvalidRequest(f'messages[{i}].role is empty: set "system", "user", ...')
