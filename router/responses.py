"""Turning a request's token ids into the GenerateResponses the client receives:
incremental detokenization, stop strings, logprobs and usage, in one place."""

from __future__ import annotations

from model.tokenizer import IncrementalDetokenizer
from protos import generator_pb2 as pb
from router.stop_strings import StopStringMatcher


class ResponseEmitter:
    """Turns token ids into GenerateResponses: detokenizes, applies stop strings,
    and counts what was sent."""

    def __init__(
        self,
        request_id: str,
        sampling: pb.SamplingParams,
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
        self.is_stopped = False
        self.finish_reason: int | None = None

    def add(self, token_ids: list[int], logprobs: list[float]) -> pb.GenerateResponse | None:
        """The message for newly generated tokens, or None when there is nothing to
        send yet (text held back for a possible stop string, and no tokens)."""
        delta = self.detokenizer.add(token_ids) if self.detokenizer else ""
        text, self.is_stopped = self.stop.feed(delta)
        self.num_sent_tokens += len(token_ids)
        if not token_ids and not text:
            return None
        return pb.GenerateResponse(
            request_id=self.request_id,
            token_ids=token_ids,
            text=text,
            logprobs=logprobs if self.want_logprobs else (),
        )

    def finish(self, message: pb.GenerateResponse | None, reason: int) -> pb.GenerateResponse:
        """The last message: held-back text (unless a stop string matched), the
        finish reason and the usage."""
        if message is None:
            message = pb.GenerateResponse(request_id=self.request_id)
        if not self.is_stopped:
            rest = self.detokenizer.flush() if self.detokenizer else ""
            message.text += self.stop.feed(rest)[0] + self.stop.flush()
        self.finish_reason = reason
        message.finish_reason = reason
        message.usage.CopyFrom(
            pb.Usage(
                prompt_tokens=self.num_prompt_tokens,
                completion_tokens=self.num_sent_tokens,
                cached_prompt_tokens=self.cached_prompt_tokens,
            )
        )
        return message
