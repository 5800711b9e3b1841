"""The OpenAI API's request and response bodies, as pydantic models.

Requests are parsed and checked by pydantic (a wrong type is a 400 that names the
field) and converted here, once, into the `GenerateRequest` the gRPC API takes, so
both APIs run the same request path and the same validation. Fields the API has
and kvrelay does not serve are refused when set to anything but their default;
fields it does not know are ignored, as OpenAI's own server ignores them. Beyond
OpenAI's fields, `top_k`, `ignore_eos`, `stop_token_ids`, `cache_salt` and (chat)
`add_generation_prompt` are taken, as vLLM takes them.

Responses are built with only the fields set that OpenAI sends (dumped with
`exclude_unset`), so `finish_reason: null` is sent where OpenAI sends it and a
chunk's delta carries only what is new.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from protos import generator_pb2 as pb


class UnsupportedField(ValueError):
    """A field set to a value kvrelay does not serve; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


# Numbers bound for proto fields, within their types: pydantic refuses the rest
# with a 400 naming the field, before any proto is built.
TokenId = Annotated[int, Field(ge=0, lt=1 << 32)]
MaxTokens = Annotated[int, Field(lt=1 << 32)]
"""Below 1 passes on as 0, so that the router's own message names it."""


class StreamOptions(BaseModel):
    include_usage: bool = False
    """Send one more chunk before `[DONE]`, with the usage and no choices."""


class _GenerationRequest(BaseModel):
    """What completions and chat completions share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: MaxTokens | None = None
    temperature: float | None = None
    """Unset means 1, OpenAI's default; 0 is greedy."""
    top_p: float | None = None
    top_k: int | None = Field(default=None, ge=-1, lt=1 << 31)
    """-1 or 0: off."""
    seed: int | None = Field(default=None, ge=0, lt=1 << 64)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    cache_salt: str | None = None
    """The prefix cache's scope (`GenerateRequest.cache_salt`); the router checks it."""

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def check_supported(self) -> None:
        """Raises UnsupportedField for what kvrelay does not serve."""
        if self.n != 1:
            raise UnsupportedField("n", f"n is {self.n}; this server generates one choice: n=1")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                raise UnsupportedField(name, f"{name} is not supported: leave it at 0")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options", "stream_options needs stream=true")

    def sampling(self, max_tokens: int | None, logprobs: bool) -> pb.SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        sampling = pb.SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_k=0 if self.top_k in (None, -1) else self.top_k,
            stop=stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )
        if max_tokens is not None:
            # Below 1 cannot be a uint32: 0 reaches the router's own message.
            sampling.max_tokens = max(max_tokens, 0)
        if self.top_p is not None:
            sampling.top_p = self.top_p
        if self.seed is not None:
            sampling.seed = self.seed
        return sampling


class CompletionRequest(_GenerationRequest):
    """`POST /v1/completions`."""

    prompt: str | list[TokenId]
    """Text, or token ids of the served model's tokenizer; one prompt per request."""
    logprobs: int | None = Field(default=None, ge=0, le=5)
    """Set (any value): the log-probability of each sampled token."""
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.echo:
            raise UnsupportedField("echo", "echo is not supported: leave it false")
        if self.suffix:
            raise UnsupportedField("suffix", "suffix is not supported: leave it unset")
        if self.best_of not in (None, 1):
            raise UnsupportedField("best_of", f"best_of is {self.best_of}; only 1 is served")

    def to_generate_request(self, request_id: str) -> pb.GenerateRequest:
        sampling = self.sampling(self.max_tokens, logprobs=self.logprobs is not None)
        if isinstance(self.prompt, str):
            return pb.GenerateRequest(
                request_id=request_id,
                prompt=self.prompt,
                sampling=sampling,
                cache_salt=self.cache_salt,
            )
        return pb.GenerateRequest(
            request_id=request_id,
            prompt_token_ids=self.prompt,
            sampling=sampling,
            cache_salt=self.cache_salt,
        )


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[TextPart] | None = None
    """Text, or text parts (joined); None (an assistant turn of tool calls) is ""."""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_GenerationRequest):
    """`POST /v1/chat/completions`."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: MaxTokens | None = None
    """Wins over the deprecated max_tokens."""
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    add_generation_prompt: bool = True
    tools: list[dict] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs:
            raise UnsupportedField(
                "top_logprobs", "top_logprobs is not supported: only the sampled token's is sent"
            )
        if self.tools:
            raise UnsupportedField("tools", "tools are not supported: send messages only")

    def to_generate_request(self, request_id: str) -> pb.GenerateRequest:
        max_tokens = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        return pb.GenerateRequest(
            request_id=request_id,
            messages=[pb.ChatMessage(role=m.role, content=m.text()) for m in self.messages],
            add_generation_prompt=self.add_generation_prompt,
            sampling=self.sampling(max_tokens, logprobs=self.logprobs),
            cache_salt=self.cache_salt,
        )


# Responses.


class _Body(BaseModel):
    """A response body; its `object` (a constant) counts as set, so a dump with
    `exclude_unset` keeps it."""

    def model_post_init(self, context: object) -> None:
        if "object" in type(self).model_fields:
            self.model_fields_set.add("object")


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class Completion(_Body):
    """A `text_completion`: the whole answer, or one streamed chunk of it."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TokenLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[dict]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(_Body):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: Literal["stop", "length"] | None


class ChatCompletionChunk(_Body):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None


class ModelCard(_Body):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kvrelay"


class ModelList(_Body):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    error: ErrorDetail
