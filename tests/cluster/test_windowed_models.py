"""Windowed models through a real cluster (router, a prefill worker, a decode worker,
Redis): Mistral with a window on every layer, Qwen2 with it on its upper layers and
Gemma 3 with global layers among windowed ones stream `transformers`' 32 greedy
tokens for prompts below, at and well past the window, prefilled by the decode
worker or by the prefill worker."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from protos import generator_pb2 as pb
from tests.cluster.local_cluster import LocalCluster, byte_level_tokenizer
from tests.model.greedy import hf_greedy

pytestmark = pytest.mark.slow

NUM_NEW_TOKENS = 32
PROMPT_LENS = (5, 16, 17, 100, 300)
CHECKPOINTS = {
    "mistral-window-32": ("mistral", {"sliding_window": 32}),
    "qwen2-upper-layers": (
        "qwen2",
        {
            "use_sliding_window": True,
            "sliding_window": 32,
            "max_window_layers": 1,
            "num_hidden_layers": 3,
        },
    ),
    "gemma3-window-16": ("gemma3", {}),
}


@pytest.fixture(params=sorted(CHECKPOINTS))
def windowed(request, hf_checkpoint, cluster_redis, tmp_path):
    kind, overrides = CHECKPOINTS[request.param]
    # A seed of its own: the tokenizer written beside it changes no shared checkpoint.
    path = hf_checkpoint(kind, seed=21, **overrides)
    byte_level_tokenizer(path)
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    cluster = LocalCluster(
        str(path), cluster_redis, tmp_path, num_decode=1, max_local_prefill_len=8
    )
    try:
        yield reference, cluster
    finally:
        cluster.stop()


def test_a_cluster_streams_transformers_tokens_for_a_windowed_model(windowed) -> None:
    reference, cluster = windowed
    generator = torch.Generator().manual_seed(4)
    for n in PROMPT_LENS:
        prompt = torch.randint(3, 259, (n,), generator=generator).tolist()
        expected = hf_greedy(reference, prompt, NUM_NEW_TOKENS)
        sampling = pb.SamplingParams(max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
        responses = cluster.generate(prompt_token_ids=prompt, sampling=sampling)
        assert [t for r in responses for t in r.token_ids] == expected, f"prompt of {n}"
    # The prompts past --max-local-prefill-len 8 were the prefill worker's.
    assert cluster.stats("prefill-0").num_computed_tokens_total == 16 + 17 + 100 + 300
