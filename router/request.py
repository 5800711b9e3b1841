"""`prepare`: a GenerateRequest checked, tokenized and hashed, ready to route.

The order is the request path's: the router's own limits on the request's shape
and sampling, then the prompt as token ids (tokenized when it is text; `messages` are first
rendered with the model's chat template, `router.chat_prompt`), then the
model's rule for prompts (`model.prompt_limits.check_prompt`), then the hash chain
of its full blocks, seeded with the cluster's KV fingerprint and the request's
cache salt (`kvstore.hashing.chain_seed`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import uuid
from dataclasses import dataclass

from kvstore.hashing import BlockHash, check_cache_salt, hash_token_blocks
from model.prompt_limits import InvalidPrompt, check_prompt
from model.sampling_params import SamplingParams
from model.tokenizer import Tokenizer
from protos import generator_pb2 as pb
from router.chat_prompt import ChatPrompts
from router.cluster import ClusterModel
from router.validation import (
    InvalidRequest,
    RequestLimits,
    validate_prompt_shape,
    validate_sampling,
)

MAX_REQUEST_ID_BYTES = 128
"""Longest client request id; it is echoed in every response."""


@dataclass(frozen=True)
class PreparedRequest:
    """A validated request, tokenized, with its block hashes."""

    request_id: str
    """The client's id (or one the router made up): echoed, never used as a key."""
    internal_id: str
    """The router's own id, unique per request: every id inside the cluster (tails,
    engine requests, aborts) derives from it."""
    prompt_token_ids: list[int]
    sampling: SamplingParams
    cache_salt: str | None
    """The salt the block hashes are seeded with, sent on to every worker: the
    request's own, scoped under the caller's key salt when there is one."""
    block_hashes: list[BlockHash]


def prepare(
    request: pb.GenerateRequest,
    limits: RequestLimits,
    model: ClusterModel,
    tokenizer: Tokenizer | None,
    chat: ChatPrompts | None = None,
    *,
    key_salt: str | None = None,
) -> PreparedRequest:
    """Raises InvalidRequest, whose message names the field and says what to change.
    `chat` renders `messages` (None: the model has no chat template). `key_salt` is
    a salt the router holds for the caller (the hook for a salt per API key): the
    request's cache_salt is then scoped under it (`scoped_cache_salt`)."""
    validate_prompt_shape(request, limits)
    if len(request.request_id.encode()) > MAX_REQUEST_ID_BYTES:
        raise InvalidRequest(
            f"request_id is {len(request.request_id.encode())} bytes; the limit is "
            f"{MAX_REQUEST_ID_BYTES}"
        )
    cache_salt = request.cache_salt if request.HasField("cache_salt") else None
    try:
        check_cache_salt(cache_salt)
    except ValueError as err:
        raise InvalidRequest(str(err)) from None
    if key_salt is not None:
        cache_salt = scoped_cache_salt(key_salt, cache_salt)
    sampling = validate_sampling(request.sampling, limits)
    if request.prompt_token_ids:
        token_ids, field = list(request.prompt_token_ids), "prompt_token_ids"
    elif tokenizer is None:
        field = "messages" if request.messages else "prompt"
        raise InvalidRequest(
            f"this model has no tokenizer.json: send prompt_token_ids instead of {field}"
        )
    elif request.messages:
        chat = chat or ChatPrompts(None, "messages need a chat template, and this router has none")
        add_generation_prompt = (
            request.add_generation_prompt if request.HasField("add_generation_prompt") else True
        )
        text = chat.render(request.messages, add_generation_prompt)
        # The template writes the BOS itself when the model wants one.
        token_ids, field = tokenizer.encode(text, add_bos=False), "messages"
        if not request.sampling.HasField("max_tokens"):
            # An answer runs to its end-of-turn: the rest of the context, within the limit.
            room = min(limits.max_tokens, model.max_context_len - len(token_ids))
            sampling = dataclasses.replace(sampling, max_tokens=max(room, 1))
    else:
        token_ids, field = tokenizer.encode(request.prompt), "prompt"
    if sampling.stop and tokenizer is None:
        raise InvalidRequest(
            "sampling.stop needs text, and this model has no tokenizer.json: use stop_token_ids"
        )
    try:
        check_prompt(
            token_ids,
            sampling.max_tokens,
            vocab_size=model.vocab_size,
            max_context_len=model.max_context_len,
            field=field,
        )
    except InvalidPrompt as err:
        raise InvalidRequest(str(err)) from None
    return PreparedRequest(
        request_id=request.request_id or uuid.uuid4().hex,
        internal_id=uuid.uuid4().hex,
        prompt_token_ids=token_ids,
        sampling=sampling,
        cache_salt=cache_salt,
        block_hashes=hash_token_blocks(
            token_ids, model.block_size, model.kv_fingerprint, cache_salt
        ),
    )


def scoped_cache_salt(key_salt: str, cache_salt: str | None) -> str:
    """One salt for a caller's key and its request's salt (or none): a hex digest of
    both, so two keys never share a block whatever salts their clients send, and a
    client cannot pick a salt that lands in another key's scope. 64 characters,
    within the salt limit the workers check."""
    digest = hashlib.blake2b(key_salt.encode("utf-8"), digest_size=32, person=b"kvrelay-keysalt")
    # A marker byte keeps "no salt" apart from every salt.
    digest.update(b"\x00" if cache_salt is None else b"\x01" + cache_salt.encode("utf-8"))
    return digest.hexdigest()
