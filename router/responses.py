"""Turning the token chunks that reach the router into the GenerateResponses the
client receives: incremental detokenization, stop strings, finish-reason
precedence, logprobs and usage, in one place."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from model.sampling_params import FinishReason, SamplingParams, final_finish_reason
from model.tokenizer import IncrementalDetokenizer
from protos import generator_pb2 as pb
from router.stop_strings import StopStringMatcher
from rpc.sampling_proto import finish_reason_to_proto


@dataclass(frozen=True)
class TokenChunk:
    """Tokens from a worker: the prefill worker's first token, or one Decode message."""

    token_ids: Sequence[int]
    logprobs: Sequence[float]
    finish_reason: FinishReason | None = None
    """The worker's token-level reason (stop token, EOS, length); None until the end."""
    num_cached_tokens: int | None = None
    """Prompt tokens whose KV was reused, when the chunk's worker knows it."""


class ResponseEmitter:
    """Turns token chunks into GenerateResponses and decides when the request ends."""

    def __init__(
        self,
        request_id: str,
        sampling: SamplingParams,
        num_prompt_tokens: int,
        detokenizer: IncrementalDetokenizer | None,
    ) -> None:
        self.request_id = request_id
        self.num_prompt_tokens = num_prompt_tokens
        self.detokenizer = detokenizer
        self.stop = StopStringMatcher(sampling.stop)
        self.want_logprobs = sampling.logprobs
        self.num_sent_tokens = 0
        self.cached_prompt_tokens = 0
        self.finish_reason: FinishReason | None = None
        """Set by the chunk that ends the request."""

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, chunk: TokenChunk) -> pb.GenerateResponse | None:
        """The message for a chunk, or None when there is nothing to send yet (text
        held back for a possible stop string, and no tokens). When the chunk ends
        the request, by its own finish reason or because a stop string matched (which
        wins over LENGTH), the message is the last one: it carries the finish reason,
        the held-back text and the usage."""
        assert not self.is_finished, "no chunk after the last"
        if chunk.num_cached_tokens is not None:
            self.cached_prompt_tokens = chunk.num_cached_tokens
        delta = self.detokenizer.add(list(chunk.token_ids)) if self.detokenizer else ""
        text, is_stop_matched = self.stop.feed(delta)
        self.num_sent_tokens += len(chunk.token_ids)
        message = pb.GenerateResponse(
            request_id=self.request_id,
            token_ids=chunk.token_ids,
            text=text,
            logprobs=chunk.logprobs if self.want_logprobs else (),
        )
        reason = final_finish_reason(chunk.finish_reason, is_stop_matched)
        if reason is not None:
            return self._finish(message, reason, is_stop_matched)
        if not chunk.token_ids and not text:
            return None
        return message

    def _finish(
        self, message: pb.GenerateResponse, reason: FinishReason, is_stop_matched: bool
    ) -> pb.GenerateResponse:
        if not is_stop_matched:
            # The detokenizer's held-back bytes may complete a stop string too.
            rest = self.detokenizer.flush() if self.detokenizer else ""
            flushed, is_stop_matched = self.stop.feed(rest)
            message.text += flushed if is_stop_matched else flushed + self.stop.flush()
            reason = final_finish_reason(reason, is_stop_matched) or reason
        self.finish_reason = reason
        message.finish_reason = finish_reason_to_proto(reason)
        message.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=self.num_prompt_tokens,
                completion_tokens=self.num_sent_tokens,
                cached_prompt_tokens=self.cached_prompt_tokens,
            )
        )
        return message
