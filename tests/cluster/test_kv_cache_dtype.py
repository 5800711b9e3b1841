"""A cluster storing K/V as int8 (`--kv-cache-dtype int8` on every worker): the
tokens it streams are those of the local engine with the same format, its status
says int8, and a worker that stores K/V in another format is refused by name."""

from __future__ import annotations

import json
import time

import pytest
import torch

from decode_worker.batch_generate import generate_with_engine
from deploy.cli import main
from model.loader import load_model
from model.sampling_params import SamplingParams
from protos import generator_pb2 as pb

pytestmark = pytest.mark.slow

MAX_LOCAL_PREFILL_LEN = 8


@pytest.fixture(scope="module")
def local(cluster_model):
    return load_model(str(cluster_model))


def local_run(local, prompts: list[list[int]], params: SamplingParams, dtype: str):
    """Each prompt's tokens and their logprobs from the local engine."""
    tokens: list[list[int]] = [[] for _ in prompts]
    logprobs: list[list[float]] = [[] for _ in prompts]
    for index, output in generate_with_engine(local, prompts, params, kv_cache_dtype=dtype):
        tokens[index].append(output.token_id)
        logprobs[index].append(output.logprob)
    return tokens, logprobs


def test_an_int8_cluster_streams_the_local_int8_tokens_and_refuses_another_format(
    make_cluster, local, capsys
):
    cluster = make_cluster(
        num_decode=1,
        max_local_prefill_len=MAX_LOCAL_PREFILL_LEN,
        worker_args=("--kv-cache-dtype", "int8"),
    )
    generator = torch.Generator().manual_seed(5)
    # A prompt the decode worker prefills itself, two that travel from the prefill
    # worker through Redis (one over several blocks), and one sharing their prefix.
    prompts = [torch.randint(3, 259, (n,), generator=generator).tolist() for n in (6, 21, 40)]
    prompts.append([*prompts[2][:32], 7, 8, 9])
    greedy = SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True)
    expected, expected_logprobs = local_run(local, prompts, greedy, "int8")
    _, full_logprobs = local_run(local, prompts, greedy, "auto")
    for i, prompt in enumerate(prompts):
        sampling = pb.SamplingParams(max_tokens=12, ignore_eos=True, logprobs=True)
        responses = cluster.generate(prompt_token_ids=prompt, sampling=sampling)
        assert [t for r in responses for t in r.token_ids] == expected[i]
        # The logprobs are int8's, not full precision's: this random model's greedy
        # tokens are the same either way, its logprobs are not.
        logprobs = torch.tensor([p for r in responses for p in r.logprobs])
        assert torch.allclose(logprobs, torch.tensor(expected_logprobs[i]), atol=1e-4)
        assert not torch.allclose(logprobs, torch.tensor(full_logprobs[i]), atol=1e-4)

    seeded = SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True)
    sampling = pb.SamplingParams(max_tokens=10, temperature=0.9, seed=3, ignore_eos=True)
    responses = cluster.generate(prompt_token_ids=prompts[1], sampling=sampling)
    assert [t for r in responses for t in r.token_ids] == local_run(
        local, [prompts[1]], seeded, "int8"
    )[0][0]

    assert main(["status", "--router", cluster.internal_target, "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["kv_cache_dtype"] == "int8"
    decode = next(w for w in status["workers"] if w["role"] == "decode")
    assert decode["kv_cache_dtype"] == "int8" and decode["kv_pool_tokens"] > 0

    cluster.start_worker("decode-auto", "decode")  # the model's dtype: "auto"
    deadline = time.monotonic() + 60
    message = "worker stores K/V as 'auto', the cluster as 'int8'"
    while message not in cluster.log("decode-auto"):
        assert time.monotonic() < deadline, cluster.log("decode-auto")
        time.sleep(0.2)
    assert "--kv-cache-dtype int8" in cluster.log("decode-auto")
    assert "decode-auto" not in cluster.workers()
