"""Conversions between the wire's sampling messages and the model's dataclasses,
done once at the edge of every worker."""

from __future__ import annotations

from model.sampling import FinishReason, SamplingParams
from protos import generator_pb2 as pb

_FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
}


def sampling_from_proto(params: pb.SamplingParams) -> SamplingParams:
    """Raises ValueError (naming the field) for values the model refuses."""
    return SamplingParams(
        max_tokens=params.max_tokens if params.HasField("max_tokens") else 16,
        temperature=params.temperature,
        top_p=params.top_p if params.HasField("top_p") else 1.0,
        top_k=params.top_k,
        seed=params.seed if params.HasField("seed") else None,
        stop=tuple(params.stop),
        stop_token_ids=tuple(params.stop_token_ids),
        ignore_eos=params.ignore_eos,
        logprobs=params.logprobs,
    )


def finish_reason_to_proto(reason: FinishReason | None) -> int:
    return pb.FINISH_REASON_UNSPECIFIED if reason is None else _FINISH_TO_PB[reason]
