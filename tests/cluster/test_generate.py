"""The Generate API through a real cluster: parity with `transformers`, prefix reuse,
stopping and sampling as in local mode, and the trace of one request."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import redis
import torch
from transformers import AutoModelForCausalLM

from kvstore.hashing import hash_token_blocks
from kvstore.spec import BlockSpec
from model.generation import generate
from model.loader import load_model
from model.sampling_params import SamplingParams
from model.sources import config_for_model, model_identity
from protos import generator_pb2 as pb

pytestmark = pytest.mark.slow


def random_prompt(n: int, seed: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, 259, (n,), generator=generator).tolist()


def tokens_of(responses: list[pb.GenerateResponse]) -> list[int]:
    return [t for r in responses for t in r.token_ids]


def text_of(responses: list[pb.GenerateResponse]) -> str:
    return "".join(r.text for r in responses)


@pytest.fixture(scope="module")
def local(cluster_model):
    return load_model(str(cluster_model))


def test_eight_concurrent_requests_match_transformers_greedy(cluster, cluster_model):
    reference = AutoModelForCausalLM.from_pretrained(cluster_model, dtype=torch.float32).eval()
    # Exactly 24 tokens, EOS or not (as ignore_eos does): min_new_tokens would instead
    # forbid EOS and so change the greedy choice where the model picks it.
    reference.generation_config.eos_token_id = None
    prompts = [random_prompt(n, seed=n) for n in (1, 7, 16, 17, 33, 64, 100, 150)]
    sampling = pb.SamplingParams(max_tokens=24, ignore_eos=True)
    with ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda p: cluster.generate(prompt_token_ids=p, sampling=sampling), prompts)
        )
    for prompt, responses in zip(prompts, results, strict=True):
        with torch.inference_mode():
            expected = reference.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=24,
                do_sample=False,
            )[0, len(prompt) :].tolist()
        assert tokens_of(responses) == expected, f"prompt of {len(prompt)} tokens"
        last = responses[-1]
        assert last.finish_reason == pb.FINISH_REASON_LENGTH
        assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (len(prompt), 24)


def finished_per_decode_worker(cluster) -> dict[str, int]:
    return {
        worker_id: cluster.stats(worker_id).num_finished_requests_total
        for worker_id in ("decode-0", "decode-1")
    }


def test_shared_prefix_is_reused_and_routed_to_the_worker_holding_it(cluster):
    prefix = random_prompt(256, seed=1234)
    first = prefix + random_prompt(20, seed=1)
    second = prefix + random_prompt(30, seed=2)
    sampling = pb.SamplingParams(max_tokens=4, ignore_eos=True)

    before = finished_per_decode_worker(cluster)
    responses = cluster.generate(prompt_token_ids=first, sampling=sampling)
    after_first = finished_per_decode_worker(cluster)
    holder = next(w for w in before if after_first[w] == before[w] + 1)
    other = "decode-1" if holder == "decode-0" else "decode-0"
    assert responses[-1].usage.cached_prompt_tokens == 0

    # Keep a long request running on the holder, so that without prefix locality
    # the router would send the next request to the idle worker.
    blocker = cluster.generator.Generate(
        pb.GenerateRequest(
            prompt_token_ids=random_prompt(40, seed=3),
            sampling=pb.SamplingParams(max_tokens=460, ignore_eos=True),
        ),
        timeout=60,
    )
    next(blocker)
    busy = finished_per_decode_worker(cluster)
    prefill_before = cluster.stats("prefill-0")
    responses = cluster.generate(prompt_token_ids=second, sampling=sampling)
    blocker.cancel()

    usage = responses[-1].usage
    assert usage.cached_prompt_tokens >= 256
    prefill_after = cluster.stats("prefill-0")
    computed = prefill_after.num_computed_tokens_total - prefill_before.num_computed_tokens_total
    assert computed == len(second) - usage.cached_prompt_tokens
    after_second = finished_per_decode_worker(cluster)
    # (The blocker may have finished on the holder too, on a slow machine.)
    assert after_second[other] == busy[other], "the worker holding the prefix was not chosen"
    assert after_second[holder] >= busy[holder] + 1


def test_stop_string_max_tokens_and_stop_token_ids_behave_as_in_local_mode(cluster, local):
    prompt = "The quick brown fox"
    params = SamplingParams(max_tokens=32, ignore_eos=True)
    expected = generate(local, [local.tokenizer.encode(prompt)], params)[0]
    full_text = local.tokenizer.decode(expected.token_ids)

    responses = cluster.generate(
        prompt=prompt, sampling=pb.SamplingParams(max_tokens=32, ignore_eos=True)
    )
    assert tokens_of(responses) == expected.token_ids
    assert text_of(responses) == full_text

    # max_tokens
    responses = cluster.generate(
        prompt=prompt, sampling=pb.SamplingParams(max_tokens=5, ignore_eos=True)
    )
    assert tokens_of(responses) == expected.token_ids[:5]
    assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH

    # stop_token_ids: generation ends at (and includes) the first occurrence.
    stop_id = expected.token_ids[6]
    cut = expected.token_ids.index(stop_id) + 1
    responses = cluster.generate(
        prompt=prompt,
        sampling=pb.SamplingParams(max_tokens=32, stop_token_ids=[stop_id], ignore_eos=True),
    )
    assert tokens_of(responses) == expected.token_ids[:cut]
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP

    # A stop string: neither it nor anything after it is sent.
    stop = full_text[10:13]
    responses = cluster.generate(
        prompt=prompt, sampling=pb.SamplingParams(max_tokens=32, stop=[stop], ignore_eos=True)
    )
    assert text_of(responses) == full_text[: full_text.index(stop)]
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP


@pytest.mark.parametrize(
    ("prompt", "path"), [("kvrelay serves models", "disaggregated"), ("Jump", "colocated")]
)
def test_a_stop_string_in_the_last_allowed_token_finishes_with_stop(cluster, local, prompt, path):
    # max_tokens=1 and a stop string that the first token completes: STOP, as the
    # decode loop reports it, wherever that token was sampled (the prefill worker for
    # the long prompt, the decode worker for the short one).
    assert (len(local.tokenizer.encode(prompt)) > cluster.max_local_prefill_len) == (
        path == "disaggregated"
    )
    params = SamplingParams(max_tokens=1, ignore_eos=True)
    first = generate(local, [local.tokenizer.encode(prompt)], params)[0].token_ids
    stop = local.tokenizer.decode(first)
    assert stop and "\ufffd" not in stop, "the model's first token is not a whole character"
    responses = cluster.generate(
        prompt=prompt, sampling=pb.SamplingParams(max_tokens=1, stop=[stop], ignore_eos=True)
    )
    assert tokens_of(responses) == first and text_of(responses) == ""
    assert responses[-1].finish_reason == pb.FINISH_REASON_STOP


def test_seeded_sampling_matches_local_mode(cluster, local):
    prompt = random_prompt(40, seed=9)
    params = SamplingParams(
        max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=77, ignore_eos=True
    )
    expected = generate(local, [prompt], params)[0].token_ids
    sampling = pb.SamplingParams(
        max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=77, ignore_eos=True
    )
    assert tokens_of(cluster.generate(prompt_token_ids=prompt, sampling=sampling)) == expected
    assert tokens_of(cluster.generate(prompt_token_ids=prompt, sampling=sampling)) == expected


def test_one_trace_spans_router_prefill_and_decode(cluster, span_collector):
    request_id = f"traced-{time.monotonic_ns()}"
    cluster.generate(
        request_id=request_id,
        prompt_token_ids=random_prompt(40, seed=5),
        sampling=pb.SamplingParams(max_tokens=3, ignore_eos=True),
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        roots = [
            s
            for s in span_collector.spans
            if s["name"] == "generate" and s["attributes"].get("kvrelay.request_id") == request_id
        ]
        trace = [s for s in span_collector.spans if roots and s["trace_id"] == roots[0]["trace_id"]]
        if {"kvrelay-router", "kvrelay-prefill", "kvrelay-decode"} <= {
            s["service"] for s in trace
        } and any(s["name"] == "decode" for s in trace):
            break
        time.sleep(0.2)
    else:
        pytest.fail(
            f"spans of {request_id} did not arrive: {[s['name'] for s in span_collector.spans]}"
        )
    by_id = {s["span_id"]: s for s in trace}
    root = roots[0]
    assert root["parent_id"] == ""
    assert root["attributes"]["gen_ai.request.model"]
    assert root["attributes"]["gen_ai.usage.input_tokens"] == 40
    assert root["attributes"]["gen_ai.usage.output_tokens"] == 3
    prefill = next(s for s in trace if s["name"] == "prefill")
    decode = next(s for s in trace if s["name"] == "decode")
    assert (prefill["service"], decode["service"]) == ("kvrelay-prefill", "kvrelay-decode")
    # Worker spans hang under the router's client spans, which hang under the root.
    assert by_id[prefill["parent_id"]]["name"] == "router.prefill"
    assert by_id[decode["parent_id"]]["name"] == "router.decode"
    assert by_id[prefill["parent_id"]]["parent_id"] == root["span_id"]
    assert by_id[decode["parent_id"]]["parent_id"] == root["span_id"]


def test_short_prompts_are_prefilled_by_the_decode_worker(cluster):
    """Conditional disaggregation: prompts up to the decode workers' limit skip the
    prefill worker, and prefix reuse still shows in usage."""
    prompt = random_prompt(cluster.max_local_prefill_len, seed=21)
    before = cluster.stats("prefill-0").num_finished_requests_total
    first = cluster.generate(
        prompt_token_ids=prompt, sampling=pb.SamplingParams(max_tokens=4, ignore_eos=True)
    )
    assert cluster.stats("prefill-0").num_finished_requests_total == before
    assert len(tokens_of(first)) == 4
    longer = random_prompt(cluster.max_local_prefill_len + 1, seed=21)
    cluster.generate(
        prompt_token_ids=longer, sampling=pb.SamplingParams(max_tokens=2, ignore_eos=True)
    )
    assert cluster.stats("prefill-0").num_finished_requests_total == before + 1


def sample_value(text: str, name: str, role: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("role") == role:
                return sample.value
    raise AssertionError(f"{name} with role={role} not exported")


def test_every_service_exports_prometheus_metrics(cluster):
    cluster.generate(
        prompt_token_ids=random_prompt(50, seed=31),
        sampling=pb.SamplingParams(max_tokens=5, ignore_eos=True),
    )
    router = cluster.metrics("router")
    assert sample_value(router, "kvrelay:time_to_first_token_seconds_count", "router") >= 1
    assert sample_value(router, "kvrelay:inter_token_latency_seconds_count", "router") >= 4
    assert sample_value(router, "kvrelay:generation_tokens_total", "router") >= 5
    assert sample_value(router, "kvrelay:num_requests_running", "router") == 0
    prefill = cluster.metrics("prefill-0")
    assert sample_value(prefill, "kvrelay:prompt_tokens_total", "prefill") >= 50
    assert sample_value(prefill, "kvrelay:kv_transfer_seconds_count", "prefill") >= 1
    assert sample_value(prefill, "kvrelay:kv_transfer_bytes_in_total", "prefill") > 0
    decode_usage = [
        sample_value(cluster.metrics(f"decode-{i}"), "kvrelay:kv_cache_usage_perc", "decode")
        for i in (0, 1)
    ]
    assert all(0.0 <= u <= 1.0 for u in decode_usage)
    generated = sum(
        sample_value(cluster.metrics(f"decode-{i}"), "kvrelay:generation_tokens_total", "decode")
        for i in (0, 1)
    )
    assert generated >= 4
    assert 'model_name="' in router


def test_a_cache_salt_shares_blocks_and_cache_hits_only_within_itself(
    cluster, cluster_model, cluster_redis
):
    # The fingerprint the workers registered (float32 on CPU, blocks of 16), which
    # covers the checkpoint's bytes: the test hashes as every service does.
    spec = BlockSpec.for_model(
        model_identity(str(cluster_model)), config_for_model(str(cluster_model)), torch.float32
    )
    raw = redis.Redis.from_url(cluster_redis)
    prefix = f"kvrelay:{spec.fingerprint.hex()}:b:"

    def stored_blocks() -> set[bytes]:
        return set(raw.scan_iter(match=f"{prefix}*", count=1000))

    prompt = random_prompt(70, seed=7070)  # 4 full blocks and a tail: prefilled remotely
    sampling = pb.SamplingParams(max_tokens=2, ignore_eos=True)
    added, cached = {}, {}
    for name, salt in (
        ("a", "tenant-a"),
        ("b", "tenant-b"),
        ("none", None),
        ("a again", "tenant-a"),
    ):
        before = stored_blocks()
        fields = {} if salt is None else {"cache_salt": salt}
        responses = cluster.generate(prompt_token_ids=prompt, sampling=sampling, **fields)
        cached[name] = responses[-1].usage.cached_prompt_tokens
        added[name] = stored_blocks() - before
        if salt is not None:
            expected = {
                f"{prefix}{h.hex()}".encode()
                for h in hash_token_blocks(prompt, spec.block_size, spec.fingerprint, salt)
            }
            assert expected <= stored_blocks(), f"{name}: its blocks are not under its hashes"
    assert cached == {"a": 0, "b": 0, "none": 0, "a again": 64}
    assert [len(added[name]) for name in ("a", "b", "none", "a again")] == [4, 4, 4, 0]
    assert added["a"].isdisjoint(added["b"]) and added["none"].isdisjoint(added["a"] | added["b"])


def test_a_cache_salt_over_256_bytes_is_invalid_argument(cluster):
    with pytest.raises(grpc.RpcError) as err:
        cluster.generate(prompt_token_ids=[5, 6, 7], cache_salt="x" * 257)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("cache_salt is 257 bytes; the limit is 256")


def test_concurrent_prompts_sharing_a_prefix_compute_it_once(cluster):
    prefix = random_prompt(256, seed=4242)
    prompts = [prefix + random_prompt(20, seed=100 + i) for i in range(4)]
    sampling = pb.SamplingParams(max_tokens=2, ignore_eos=True)
    before = cluster.stats("prefill-0").num_computed_tokens_total
    with ThreadPoolExecutor(4) as pool:
        results = list(
            pool.map(lambda p: cluster.generate(prompt_token_ids=p, sampling=sampling), prompts)
        )
    computed = cluster.stats("prefill-0").num_computed_tokens_total - before
    assert computed == 276 + 3 * 20, "the shared 256-token prefix was computed more than once"
    cached = sorted(r[-1].usage.cached_prompt_tokens for r in results)
    assert cached == [0, 256, 256, 256]


def test_eos_stops_generation_unless_ignore_eos_as_in_local_mode(cluster, local):
    from tests.cluster.conftest import EOS_PROBE_PROMPT

    eos = local.config.eos_token_ids[0]
    for ignore_eos in (False, True):
        params = SamplingParams(max_tokens=10, ignore_eos=ignore_eos)
        expected = generate(local, [EOS_PROBE_PROMPT], params)[0]
        responses = cluster.generate(
            prompt_token_ids=EOS_PROBE_PROMPT,
            sampling=pb.SamplingParams(max_tokens=10, ignore_eos=ignore_eos),
        )
        assert tokens_of(responses) == expected.token_ids, f"ignore_eos={ignore_eos}"
        if ignore_eos:
            assert len(expected.token_ids) == 10
            assert responses[-1].finish_reason == pb.FINISH_REASON_LENGTH
        else:
            assert expected.token_ids[-1] == eos and len(expected.token_ids) < 10
            assert responses[-1].finish_reason == pb.FINISH_REASON_STOP
