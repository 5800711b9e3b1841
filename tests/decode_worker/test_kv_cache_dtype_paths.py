"""Every KV cache dtype through every path, without sockets: the local engine
(colocated: the decode engine prefills), and the disaggregated flows (a prefill
engine that computes in chunks, the memory store, the decode flow) give the same
tokens; 8-bit blocks are what the prefill worker publishes, what the store holds
and what the decode pool holds, byte for byte, with no conversion on the way."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from decode_worker.batch_generate import generate_with_engine
from kvstore.hashing import hash_token_blocks
from kvstore.kv_quant import KVCacheFormat
from model.loader import LoadedModel, load_model
from model.sampling_params import SamplingParams
from tests.decode_worker.disaggregated import BLOCK_SIZE, Disaggregated

PROMPTS = [
    list(range(3, 8)),  # shorter than a block: the tail only
    list(range(40, 72)),  # exactly two blocks
    [*range(40, 72), *range(100, 121)],  # shares two blocks with the last, then 21 more
]
PARAMS = [
    SamplingParams(max_tokens=24, ignore_eos=True),
    SamplingParams(max_tokens=24, temperature=1.0, seed=7, ignore_eos=True),
]


@pytest.fixture(scope="module")
def model() -> LoadedModel:
    return load_model("dummy:tiny")


def local_tokens(
    model: LoadedModel, params: SamplingParams, kv_cache_dtype: str
) -> list[list[int]]:
    tokens: list[list[int]] = [[] for _ in PROMPTS]
    for index, output in generate_with_engine(model, PROMPTS, params, kv_cache_dtype):
        tokens[index].append(output.token_id)
    return tokens


@pytest.fixture(params=["int8", "fp8_e4m3", "auto"])
def kv_cache_dtype(request) -> str:
    return request.param


@pytest.fixture
def disaggregated(model, kv_cache_dtype) -> Iterator[Disaggregated]:
    with Disaggregated(model, kv_cache_dtype) as cluster:
        yield cluster


@pytest.mark.parametrize("params", PARAMS, ids=["greedy", "seeded"])
def test_local_and_disaggregated_give_the_same_tokens(
    model, kv_cache_dtype, disaggregated, params
) -> None:
    local = local_tokens(model, params, kv_cache_dtype)
    # One after another, so that the third prompt's first two blocks come from the
    # store (published by the second request) and are not recomputed.
    remote = [disaggregated.generate(f"r{i}", p, params) for i, p in enumerate(PROMPTS)]
    assert remote == local
    assert disaggregated.prefill_engine.counters.num_cached_tokens_total == 32


def test_8bit_blocks_travel_unconverted(model, kv_cache_dtype, disaggregated) -> None:
    prompt = PROMPTS[1]
    disaggregated.generate("a", prompt, PARAMS[0])
    hashes = hash_token_blocks(prompt, BLOCK_SIZE, disaggregated.spec.fingerprint)
    stored = disaggregated.store.get(hashes)
    pool = disaggregated.loop.engine.pool
    kv_format = KVCacheFormat(kv_cache_dtype, model.dtype)
    row_width = kv_format.row_width(model.config.head_dim)
    assert pool.kv.dtype == kv_format.storage_dtype and pool.kv.shape[-1] == row_width
    for block_hash, block in zip(hashes, stored, strict=True):
        assert block.dtype == kv_format.storage_dtype and block.shape[-1] == row_width
        # The decode pool holds the store's bytes exactly: copied in, not converted.
        assert torch.equal(pool.read_block(pool.cached_block(block_hash)), block)


def test_quantized_prefill_publishes_the_rows_attention_read(model) -> None:
    # Each stored row is the 8-bit form of the full-precision K/V of the same token.
    prompt = PROMPTS[1]
    with Disaggregated(model, "auto") as full, Disaggregated(model, "int8") as quantized:
        full.generate("a", prompt, PARAMS[0])
        quantized.generate("a", prompt, PARAMS[0])
        full_blocks = full.store.get(hash_token_blocks(prompt, BLOCK_SIZE, full.spec.fingerprint))
        int8_blocks = quantized.store.get(
            hash_token_blocks(prompt, BLOCK_SIZE, quantized.spec.fingerprint)
        )
    kv_format = KVCacheFormat("int8", model.dtype)
    # Layer 0's K/V depend only on the embeddings, so they are exactly comparable.
    first_layer = kv_format.quantize(full_blocks[0][0])
    assert torch.equal(int8_blocks[0][0], first_layer)
    for full_block, int8_block in zip(full_blocks, int8_blocks, strict=True):
        error = (kv_format.dequantize(int8_block) - full_block).abs().max()
        assert 0 < error < 0.05 * full_block.abs().max()
