"""CUDA-graph decode's bucket and padding logic, on the CPU.

The CPU has no graphs, but `DecodeGraphs.run` runs the very step a graph would hold
there: the decodes packed into the static buffers, padded to their bucket. So an
engine with `DecodeGraphs` on the CPU must generate exactly what the eager engine
does, store nothing for padding rows, and fall back to eager steps where a graph
cannot run. On CUDA hosts the last test checks graphs against `--enforce-eager`.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from decode_worker.cuda_graphs import (
    PADDING_CONTEXT_LEN,
    PADDING_SLOT,
    DecodeGraphs,
    StaticDecodeInputs,
    bucket_for,
    graph_batch_sizes,
)
from decode_worker.engine import DecodeEngine, EngineRequest
from decode_worker.engine_config import EngineConfig
from decode_worker.scheduler import SchedulerConfig
from decode_worker.scheduler_output import ScheduledSequence
from model.loader import load_model
from model.sampling_params import SamplingParams

BLOCK_SIZE = 4


@pytest.mark.parametrize(
    ("max_num_seqs", "sizes"),
    [
        (1, (1,)),
        (2, (1, 2)),
        (10, (1, 2, 4, 8, 10)),
        (16, (1, 2, 4, 8, 16)),
        (20, (1, 2, 4, 8, 16, 20)),
        (64, (1, 2, 4, 8, 16, 32, 48, 64)),
    ],
)
def test_graph_batch_sizes_ladder(max_num_seqs: int, sizes: tuple[int, ...]) -> None:
    assert graph_batch_sizes(max_num_seqs) == sizes


def test_graph_batch_sizes_refuses_an_empty_batch() -> None:
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        graph_batch_sizes(0)


@pytest.mark.parametrize(
    ("num_seqs", "bucket"),
    [(1, 1), (2, 2), (3, 4), (5, 8), (8, 8), (9, 16), (16, 16), (17, 32), (64, 64), (65, None)],
)
def test_bucket_is_the_smallest_that_holds_the_batch(num_seqs: int, bucket: int | None) -> None:
    assert bucket_for(num_seqs, graph_batch_sizes(64)) == bucket


def test_bucket_for_no_sequences_is_an_error() -> None:
    with pytest.raises(ValueError, match="at least one sequence"):
        bucket_for(0, (1, 2))


def decode(
    request_id: str, token: int, context_len: int, blocks: tuple[int, ...]
) -> ScheduledSequence:
    pos = context_len - 1
    slot = blocks[pos // BLOCK_SIZE] * BLOCK_SIZE + pos % BLOCK_SIZE
    return ScheduledSequence(request_id, (token,), pos, blocks, (slot,), is_sampled=True)


def test_fill_packs_decodes_and_pads_the_bucket() -> None:
    inputs = StaticDecodeInputs(max_num_seqs=8, max_blocks_per_seq=5, device=torch.device("cpu"))
    decodes = [decode("a", 11, 6, (7, 3)), decode("b", 12, 9, (2, 5, 4))]
    inputs.fill(decodes, batch_size=4)
    assert inputs.input_ids[:4].tolist() == [11, 12, 0, 0]
    assert inputs.positions[:4].tolist() == [5, 8, 0, 0]
    # a: position 5 is block 1 (physical 3), offset 1; b: position 8 is block 2 (4), offset 0.
    assert inputs.slot_mapping[:4].tolist() == [13, 16, PADDING_SLOT, PADDING_SLOT]
    assert inputs.context_lens[:4].tolist() == [6, 9, PADDING_CONTEXT_LEN, PADDING_CONTEXT_LEN]
    assert inputs.block_tables[:4, :3].tolist() == [[7, 3, 0], [2, 5, 4], [0, 0, 0], [0, 0, 0]]
    assert inputs.block_tables.dtype == inputs.context_lens.dtype == torch.int32

    # A narrower step rewrites only the columns it uses: b's stale block 4 stays in
    # column 2, which its context (one block) never reaches.
    inputs.fill([decode("c", 13, 2, (6,))], batch_size=2)
    assert inputs.input_ids[:2].tolist() == [13, 0]
    assert inputs.slot_mapping[:2].tolist() == [25, PADDING_SLOT]
    assert inputs.context_lens[:2].tolist() == [2, PADDING_CONTEXT_LEN]
    assert inputs.block_tables[:2].tolist() == [[6, 3, 0, 0, 0], [0, 5, 4, 0, 0]]


def test_fill_refuses_what_does_not_fit() -> None:
    inputs = StaticDecodeInputs(max_num_seqs=2, max_blocks_per_seq=2, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="3 decodes in a batch of 2"):
        inputs.fill([decode(str(i), 1, 2, (0,)) for i in range(3)], batch_size=2)
    too_wide = decode("w", 1, 9, (0, 1, 2))
    assert not inputs.fits([too_wide])
    with pytest.raises(ValueError, match="more blocks than the buffers"):
        inputs.fill([too_wide], batch_size=1)
    chunk = ScheduledSequence("p", (1, 2), 0, (0,), (0, 1), is_sampled=True)
    assert not inputs.fits([chunk])


@pytest.fixture(scope="module")
def tiny():
    return load_model("dummy:tiny")


def make_engine(tiny, *, max_num_seqs: int, with_graphs: bool) -> DecodeEngine:
    config = EngineConfig(
        num_blocks=64,
        block_size=BLOCK_SIZE,
        scheduler=SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=64),
    )
    engine = DecodeEngine(tiny, config, b"graphs")
    if with_graphs:
        engine.runner.graphs = DecodeGraphs(
            tiny.model,
            engine.pool,
            max_num_seqs,
            tiny.device,
            engine.runner.attention_for_graph,
        )
    return engine


def generate(engine: DecodeEngine, prompts: list[list[int]], max_tokens: list[int]):
    for i, (prompt, n) in enumerate(zip(prompts, max_tokens, strict=True)):
        params = SamplingParams(max_tokens=n, ignore_eos=True)
        engine.add_request(EngineRequest(str(i), prompt, params))
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    logprobs: dict[str, list[float]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id].append(out.token_id)
            logprobs[out.request_id].append(out.logprob)
    return tokens, logprobs


def test_padded_graph_steps_generate_what_eager_steps_do(tiny) -> None:
    # Three sequences finishing at different steps: the batch shrinks 3 -> 2 -> 1,
    # run in buckets 4 (one padding row), 2 and 1.
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21]]
    max_tokens = [12, 7, 3]
    eager = make_engine(tiny, max_num_seqs=8, with_graphs=False)
    graphed = make_engine(tiny, max_num_seqs=8, with_graphs=True)
    assert graphed.runner.graphs is not None
    calls: list[int] = []
    run = graphed.runner.graphs.run

    def counting_run(decodes):
        calls.append(len(decodes))
        return run(decodes)

    graphed.runner.graphs.run = counting_run  # type: ignore[method-assign]
    expected_tokens, expected_logprobs = generate(eager, prompts, max_tokens)
    tokens, logprobs = generate(graphed, prompts, max_tokens)
    assert tokens == expected_tokens
    for request_id, values in logprobs.items():
        assert values == pytest.approx(expected_logprobs[request_id], abs=1e-5)
    # Every decode-only step took the graph path, at every batch size on the way.
    assert {3, 2, 1} <= set(calls)
    # Padding rows stored nothing: both pools hold the same K/V.
    for layer in range(tiny.config.num_layers):
        assert torch.allclose(graphed.pool.key_cache(layer), eager.pool.key_cache(layer), atol=1e-6)
        assert torch.allclose(
            graphed.pool.value_cache(layer), eager.pool.value_cache(layer), atol=1e-6
        )


def test_steps_past_the_largest_bucket_run_eagerly(tiny) -> None:
    # Graph buffers for 2 sequences, a scheduler running 3: every 3-wide step is eager.
    engine = make_engine(tiny, max_num_seqs=3, with_graphs=False)
    graphs = DecodeGraphs(
        tiny.model, engine.pool, 2, tiny.device, engine.runner.attention_for_graph
    )
    engine.runner.graphs = graphs
    assert graphs.run([decode(str(i), 1, 2, (0,)) for i in range(3)]) is None
    reference = make_engine(tiny, max_num_seqs=3, with_graphs=False)
    prompts, max_tokens = [[5, 6], [7, 8, 9], [10]], [4, 4, 4]
    assert generate(engine, prompts, max_tokens)[0] == generate(reference, prompts, max_tokens)[0]


def test_cpu_engine_captures_no_graphs(tiny) -> None:
    engine = DecodeEngine(tiny, EngineConfig(num_blocks=8, block_size=BLOCK_SIZE), b"cpu")
    assert engine.runner.graphs is None
    graphs = DecodeGraphs(
        tiny.model, engine.pool, 2, tiny.device, engine.runner.attention_for_graph
    )
    with pytest.raises(RuntimeError, match="CUDA graphs need a CUDA device"):
        graphs.capture()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphs_match_enforce_eager() -> None:
    loaded = load_model("dummy:tiny", device="cuda")
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21]]
    max_tokens = [12, 7, 3]
    config = EngineConfig(num_blocks=64, block_size=16)
    graphed = DecodeEngine(loaded, config, b"graphs")
    eager = DecodeEngine(loaded, dataclasses.replace(config, enforce_eager=True), b"graphs")
    assert graphed.runner.graphs is not None and graphed.runner.graphs.is_captured
    assert eager.runner.graphs is None
    assert generate(graphed, prompts, max_tokens)[0] == generate(eager, prompts, max_tokens)[0]
