"""Requests through a real cluster, read back from a real Arize Phoenix: one trace
per request, spans from all three services, correctly parented, GenAI attributes."""

from __future__ import annotations

import pytest
from phoenix_client import wait_for_trace

from protos import generator_pb2 as pb

pytestmark = pytest.mark.slow

ROUTER_SPANS = {"generate", "router.prefill", "router.decode"}
PREFILL_SPANS = {"prefill", "prefill.queue", "prefill.forward", "kvstore.lookup", "kvstore.put"}
DECODE_SPANS = {"decode", "decode.admission", "kvstore.get", "decode.queue", "decode.generation"}

# child -> parent, by span name, within one request's trace.
PARENT_OF = {
    "router.prefill": "generate",
    "router.decode": "generate",
    "prefill": "router.prefill",
    "prefill.queue": "prefill",
    "prefill.forward": "prefill",
    "kvstore.lookup": "prefill",
    "kvstore.put": "prefill",
    "decode": "router.decode",
    "decode.admission": "decode",
    "kvstore.get": "decode.admission",
    "decode.queue": "decode",
    "decode.generation": "decode",
}

# 2 full blocks of 16 and a tail of 8, sharing no block with the other tests' prompts.
PROMPT = list(range(200, 240))


def test_each_request_is_one_trace_across_router_prefill_and_decode(observed_cluster, phoenix):
    request_ids = ["phoenix-a", "phoenix-b"]
    for request_id in request_ids:
        responses = observed_cluster.generate(
            request_id=request_id,
            prompt_token_ids=PROMPT,
            sampling=pb.SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True),
        )
        assert sum(len(r.token_ids) for r in responses) == 6

    traces = [
        wait_for_trace(phoenix.url, rid, ROUTER_SPANS | PREFILL_SPANS | DECODE_SPANS)
        for rid in request_ids
    ]
    trace_ids = [{s["context"]["trace_id"] for s in trace} for trace in traces]
    assert all(len(ids) == 1 for ids in trace_ids), trace_ids
    assert trace_ids[0] != trace_ids[1]

    for request_id, trace in zip(request_ids, traces, strict=True):
        # One of each span: no retries, no duplicate export.
        assert sorted(s["name"] for s in trace) == sorted([*PARENT_OF, "generate"]), request_id
        by_name = {s["name"]: s for s in trace}
        by_span_id = {s["context"]["span_id"]: s for s in trace}
        assert by_name["generate"]["parent_id"] is None
        for child, parent in PARENT_OF.items():
            assert by_span_id[by_name[child]["parent_id"]]["name"] == parent, child

        root = by_name["generate"]["attributes"]
        assert root["gen_ai.operation.name"] == "text_completion"
        assert root["gen_ai.request.model"] == observed_cluster.model
        assert root["gen_ai.request.max_tokens"] == 6
        assert root["gen_ai.request.temperature"] == 0.0
        assert root["gen_ai.usage.input_tokens"] == 40
        assert root["gen_ai.usage.output_tokens"] == 6
        assert root["gen_ai.response.finish_reasons"] == ["length"]
        assert root["kvrelay.prefill_worker"] == "prefill-0"
        assert root["kvrelay.decode_worker"] == "decode-0"
        # The second request reuses the first one's two full blocks.
        expected_cached = 0 if request_id == "phoenix-a" else 32
        assert root["kvrelay.cached_prompt_tokens"] == expected_cached
        forward = by_name["prefill.forward"]["attributes"]
        assert forward["kvrelay.cached_prompt_tokens"] == expected_cached
        assert forward["kvrelay.computed_prompt_tokens"] == 40 - expected_cached
        assert by_name["kvstore.lookup"]["attributes"]["kvrelay.num_blocks"] == 2
        assert by_name["kvstore.lookup"]["attributes"]["kvrelay.num_hits"] == expected_cached // 16
        generation = by_name["decode.generation"]["attributes"]
        # The first token came from prefill; decode generated the other five.
        assert generation["kvrelay.num_generated_tokens"] == 5
        assert 0 < generation["kvrelay.time_to_first_token_s"] < 30
        assert 0 <= by_name["decode"]["attributes"]["kvrelay.queue_time_s"] < 30
        admission = by_name["decode.admission"]["attributes"]
        # First request: 2 full blocks and the tail fetched. Second: the full blocks
        # are still in the decode pool (freed but kept by hash), only its tail travels.
        expected_blocks = (0, 3) if request_id == "phoenix-a" else (2, 1)
        assert (
            admission["kvrelay.num_resident_blocks"],
            admission["kvrelay.num_fetched_blocks"],
        ) == expected_blocks
        # Prompt and completion text are not recorded without the operator's opt-in.
        for span in trace:
            assert not any("prompt" in k and "token" not in k for k in span["attributes"]), span
