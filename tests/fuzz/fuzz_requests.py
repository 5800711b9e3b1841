"""Fuzzes what the cluster accepts from a caller: a serialized `GenerateRequest`
through the router's `prepare` (limits, chat template, tokenizer, prompt rule,
block hashes); an OpenAI completions or chat body through its pydantic model into
the same `prepare`; and a serialized worker `DecodeRequest` through the decode
worker's checks. Every input is either prepared or refused with the error the
servicer turns into INVALID_ARGUMENT (HTTP 400): nothing else is ever raised.
What is prepared is within every bound: ids in the vocabulary, prompt and answer
within the context, the router's limits, and one block hash per full block.

The input's first byte chooses the entry point (0: gRPC, 1: completions JSON,
2: chat JSON, 3: DecodeRequest).
"""

from __future__ import annotations

import json

import atheris
import harness  # sets sys.path: before any of the packages
import pydantic
from google.protobuf.message import DecodeError

with atheris.instrument_imports(include=["router", "model", "rpc", "decode_worker", "kvstore"]):
    from decode_worker.admission import check_call
    from decode_worker.service import call_from_proto
    from model.chat_template import ChatTemplate
    from model.config import ModelConfig
    from model.tokenizer import ByteTokenizer
    from protos import generator_pb2 as pb
    from protos import workers_pb2 as wpb
    from router.chat_prompt import ChatPrompts
    from router.cluster import ClusterModel
    from router.openai_models import ChatCompletionRequest, CompletionRequest, UnsupportedField
    from router.request import MAX_REQUEST_ID_BYTES, prepare
    from router.validation import InvalidRequest, RequestLimits

LIMITS = RequestLimits(max_tokens=64, max_request_bytes=4096, max_prompt_bytes=1024)
MODEL = ClusterModel("fuzz:requests", b"f" * 16, block_size=4, vocab_size=259, max_context_len=128)
WORKER_MODEL = ModelConfig(
    architecture="LlamaForCausalLM",
    vocab_size=259,
    hidden_size=8,
    intermediate_size=16,
    num_layers=1,
    num_heads=2,
    num_kv_heads=1,
    head_dim=4,
    max_position_embeddings=128,
)
TOKENIZER = ByteTokenizer()
CHAT = ChatPrompts(
    ChatTemplate(
        "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
)
_BODIES = (CompletionRequest, ChatCompletionRequest)


def seeds() -> list[bytes]:
    grpc_requests = [
        pb.GenerateRequest(prompt="hello", sampling=pb.SamplingParams(max_tokens=8)),
        pb.GenerateRequest(
            prompt_token_ids=[1, 2, 3, 4, 5],
            cache_salt="tenant",
            request_id="r1",
            sampling=pb.SamplingParams(temperature=0.5, stop=["x"], stop_token_ids=[7]),
        ),
        pb.GenerateRequest(messages=[pb.ChatMessage(role="user", content="hi")]),
    ]
    bodies = [
        {"model": "m", "prompt": "hello", "max_tokens": 8, "stop": ["\n"], "temperature": 0.7},
        {"model": "m", "prompt": [1, 2, 3], "logprobs": 2, "seed": 3},
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True},
    ]
    decode = wpb.DecodeRequest(
        request_id="d",
        prompt_token_ids=[1, 2, 3, 4, 5],
        prefill=wpb.PrefillResult(first_token_id=9, tail_id="t", has_tail=True),
    )
    return [
        *(b"\x00" + r.SerializeToString() for r in grpc_requests),
        *(bytes([1 if "prompt" in b else 2]) + json.dumps(b).encode() for b in bodies),
        b"\x03" + decode.SerializeToString(),
    ]


def check_prepared(request: pb.GenerateRequest) -> None:
    prepared = prepare(request, LIMITS, MODEL, TOKENIZER, CHAT)
    tokens, sampling = prepared.prompt_token_ids, prepared.sampling
    assert tokens and all(0 <= t < MODEL.vocab_size for t in tokens)
    assert len(tokens) + sampling.max_tokens <= MODEL.max_context_len
    assert 1 <= sampling.max_tokens <= LIMITS.max_tokens
    assert len(sampling.stop) <= LIMITS.max_stop_strings
    assert len(sampling.stop_token_ids) <= LIMITS.max_stop_token_ids
    assert len(prepared.request_id.encode()) <= MAX_REQUEST_ID_BYTES
    assert len(prepared.block_hashes) == len(tokens) // MODEL.block_size


def test_one_input(data: bytes) -> None:
    if not data:
        return
    mode, body = data[0] % 4, data[1:]
    try:
        if mode == 0:
            request = pb.GenerateRequest()
            request.ParseFromString(body)
            check_prepared(request)
        elif mode in (1, 2):
            parsed = _BODIES[mode - 1].model_validate_json(body)
            check_prepared(parsed.to_generate_request("fuzz-id"))
        else:
            decode = wpb.DecodeRequest()
            decode.ParseFromString(body)
            check_call(call_from_proto(decode), WORKER_MODEL)
    except (DecodeError, pydantic.ValidationError, UnsupportedField, InvalidRequest):
        harness.refused()
        return
    except ValueError:  # the decode worker's refusals (InvalidPrompt, bad sampling)
        if mode != 3:
            raise
        harness.refused()
        return
    harness.accepted()


if __name__ == "__main__":
    harness.run(test_one_input, seeds)
