"""Turning the relay's stream of `GenerateResponse`s into OpenAI's bodies: one
answer (`collect` + `completion_body` / `chat_body`), or server-sent events
(`completion_events` / `chat_events`) that end with `data: [DONE]`.

The relay has already detokenized, applied stop strings and counted usage; this
only re-shapes, so HTTP and gRPC answers are the same text and the same counts.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from model.tokenizer import Tokenizer
from protos import generator_pb2 as pb
from router.openai_models import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatLogprobs,
    ChunkChoice,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    Delta,
    PromptTokensDetails,
    TokenLogprob,
    Usage,
)

FINISH_REASONS = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length"}
DONE_EVENT = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class ResponseMeta:
    """What every body of one request repeats."""

    id: str
    created: int
    model: str
    tokenizer: Tokenizer | None
    """For the text of each token in logprobs (None: `token_id:<id>`)."""
    want_logprobs: bool = False
    include_usage: bool = False

    def token_text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id]) or self.tokenizer.special_token_text(token_id)


@dataclass
class Answer:
    """A whole request's responses, joined."""

    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish_reason: str = "stop"
    usage: pb.Usage = field(default_factory=pb.Usage)


async def collect(responses: AsyncIterator[pb.GenerateResponse]) -> Answer:
    answer = Answer()
    async for response in responses:
        answer.text.append(response.text)
        answer.token_ids.extend(response.token_ids)
        answer.logprobs.extend(response.logprobs)
        if response.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            answer.finish_reason = FINISH_REASONS[response.finish_reason]
            answer.usage = response.usage
    return answer


def usage_body(usage: pb.Usage) -> Usage:
    return Usage(
        prompt_tokens=usage.prompt_tokens,
        completion_tokens=usage.completion_tokens,
        total_tokens=usage.prompt_tokens + usage.completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=usage.cached_prompt_tokens),
    )


def completion_body(answer: Answer, meta: ResponseMeta) -> Completion:
    logprobs = (
        _completion_logprobs(answer.token_ids, answer.logprobs, meta, 0)
        if meta.want_logprobs
        else None
    )
    choice = CompletionChoice(
        index=0, text="".join(answer.text), logprobs=logprobs, finish_reason=answer.finish_reason
    )
    return Completion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[choice],
        usage=usage_body(answer.usage),
    )


def chat_body(answer: Answer, meta: ResponseMeta) -> ChatCompletion:
    logprobs = (
        _chat_logprobs(answer.token_ids, answer.logprobs, meta) if meta.want_logprobs else None
    )
    choice = ChatChoice(
        index=0,
        message=AssistantMessage(content="".join(answer.text)),
        logprobs=logprobs,
        finish_reason=answer.finish_reason,
    )
    return ChatCompletion(
        id=meta.id,
        created=meta.created,
        model=meta.model,
        choices=[choice],
        usage=usage_body(answer.usage),
    )


def event(body: Completion | ChatCompletionChunk | dict) -> bytes:
    if isinstance(body, dict):
        import json

        return b"data: " + json.dumps(body).encode() + b"\n\n"
    return b"data: " + body.model_dump_json(exclude_unset=True).encode() + b"\n\n"


async def completion_events(
    responses: AsyncIterator[pb.GenerateResponse], meta: ResponseMeta
) -> AsyncIterator[bytes]:
    """One `text_completion` chunk per response that has text or ends the request."""
    text_offset = 0
    async for response in responses:
        reason = FINISH_REASONS.get(response.finish_reason)
        if not response.text and reason is None:
            continue
        logprobs = None
        if meta.want_logprobs:
            logprobs = _completion_logprobs(
                response.token_ids, response.logprobs, meta, text_offset
            )
        text_offset += len(response.text)
        choice = CompletionChoice(
            index=0, text=response.text, logprobs=logprobs, finish_reason=reason
        )
        chunk = Completion(id=meta.id, created=meta.created, model=meta.model, choices=[choice])
        if meta.include_usage:
            chunk.usage = None
        yield event(chunk)
        if reason is not None and meta.include_usage:
            yield event(
                Completion(
                    id=meta.id,
                    created=meta.created,
                    model=meta.model,
                    choices=[],
                    usage=usage_body(response.usage),
                )
            )
    yield DONE_EVENT


async def chat_events(
    responses: AsyncIterator[pb.GenerateResponse], meta: ResponseMeta
) -> AsyncIterator[bytes]:
    """OpenAI's chunk order: the role first, then the content, then the finish
    reason with an empty delta, then (include_usage) the usage with no choices."""
    yield _chat_chunk(meta, Delta(role="assistant", content=""), None)
    async for response in responses:
        reason = FINISH_REASONS.get(response.finish_reason)
        if response.text:
            logprobs = (
                _chat_logprobs(response.token_ids, response.logprobs, meta)
                if meta.want_logprobs
                else None
            )
            yield _chat_chunk(meta, Delta(content=response.text), None, logprobs)
        if reason is not None:
            yield _chat_chunk(meta, Delta(), reason)
            if meta.include_usage:
                usage = ChatCompletionChunk(
                    id=meta.id,
                    created=meta.created,
                    model=meta.model,
                    choices=[],
                    usage=usage_body(response.usage),
                )
                yield event(usage)
    yield DONE_EVENT


def _chat_chunk(
    meta: ResponseMeta, delta: Delta, reason: str | None, logprobs: ChatLogprobs | None = None
) -> bytes:
    choice = ChunkChoice(index=0, delta=delta, logprobs=logprobs, finish_reason=reason)
    chunk = ChatCompletionChunk(
        id=meta.id, created=meta.created, model=meta.model, choices=[choice]
    )
    if meta.include_usage:
        chunk.usage = None
    return event(chunk)


def _completion_logprobs(
    token_ids, logprobs, meta: ResponseMeta, text_offset: int
) -> CompletionLogprobs:
    tokens = [meta.token_text(t) for t in token_ids]
    offsets = []
    for token in tokens:
        offsets.append(text_offset)
        text_offset += len(token)
    return CompletionLogprobs(
        tokens=tokens,
        token_logprobs=list(logprobs),
        top_logprobs=[{t: lp} for t, lp in zip(tokens, logprobs, strict=True)],
        text_offset=offsets,
    )


def _chat_logprobs(token_ids, logprobs, meta: ResponseMeta) -> ChatLogprobs:
    content = []
    for token_id, logprob in zip(token_ids, logprobs, strict=True):
        token = meta.token_text(token_id)
        content.append(
            TokenLogprob(token=token, logprob=logprob, bytes=list(token.encode()), top_logprobs=[])
        )
    return ChatLogprobs(content=content)
