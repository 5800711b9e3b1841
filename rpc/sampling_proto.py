"""Conversions between the wire's sampling messages and the model's dataclasses,
done once at the edge of every service."""

from __future__ import annotations

from model.sampling_params import DEFAULT_MAX_TOKENS, FinishReason, SamplingParams
from protos import generator_pb2 as pb

_FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
}
_FINISH_FROM_PB = {code: reason for reason, code in _FINISH_TO_PB.items()}


def sampling_from_proto(params: pb.SamplingParams) -> SamplingParams:
    """Unset fields take `SamplingParams`' defaults. Raises ValueError (naming the
    field, without the `sampling.` prefix) for values the model refuses."""
    return SamplingParams(
        max_tokens=params.max_tokens if params.HasField("max_tokens") else DEFAULT_MAX_TOKENS,
        temperature=params.temperature,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        top_k=params.top_k,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
    )


def sampling_to_proto(params: SamplingParams) -> pb.SamplingParams:
    """Every field set, so the receiver needs no defaults of its own."""
    message = pb.SamplingParams(
        max_tokens=params.max_tokens,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k,
        stop=params.stop,
        stop_token_ids=params.stop_token_ids,
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
    )
    if params.seed is not None:
        message.seed = params.seed
    return message


def finish_reason_to_proto(reason: FinishReason | None) -> int:
    return pb.FINISH_REASON_UNSPECIFIED if reason is None else _FINISH_TO_PB[reason]


def finish_reason_from_proto(code: int) -> FinishReason | None:
    """None for FINISH_REASON_UNSPECIFIED (not finished)."""
    return _FINISH_FROM_PB.get(code)
