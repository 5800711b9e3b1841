"""`generate_with_engine`: every prompt through one `DecodeEngine` in this process,
as one continuous batch, the colocated path (`kvrelay generate --local`, parity
tests, the real-model benchmark)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

from decode_worker.engine import DecodeEngine, EngineRequest, TokenOutput
from decode_worker.engine_config import EngineConfig
from kvstore.kv_format import AUTO
from kvstore.spec import BlockSpec
from model.loader import LoadedModel
from model.sampling_params import SamplingParams
from model.sources import model_identity

# The engine's defaults: at most 512 MiB of KV pool, 512 tokens per step.
_ENGINE = EngineConfig()


def generate_with_engine(
    loaded: LoadedModel,
    prompts: list[list[int]],
    params: SamplingParams,
    kv_cache_dtype: str = AUTO,
    enforce_eager: bool = False,
) -> Iterator[tuple[int, TokenOutput]]:
    """(prompt index, token) in the order the engine samples them; all prompts are queued
    at once and run as one continuous batch, their K/V stored as `kv_cache_dtype`
    (on CUDA, decode steps replay CUDA graphs unless `enforce_eager`).
    Raises `RequestTooLargeError` when a prompt plus `params.max_tokens` cannot fit in
    the KV pool."""
    block_size = _ENGINE.block_size
    spec = BlockSpec.for_model(
        model_identity(loaded.name), loaded.config, loaded.dtype, block_size, kv_cache_dtype
    )
    # A pool just big enough for every prompt at its longest, all at once, so a short
    # command does not zero 512 MiB first; never more than the engine's default bytes.
    num_needed_blocks = sum(-(-(len(p) + params.max_tokens) // block_size) for p in prompts)
    num_blocks = min(num_needed_blocks, _ENGINE.kv_cache_bytes // spec.nbytes)
    config = dataclasses.replace(
        _ENGINE, num_blocks=max(num_blocks, 1), enforce_eager=enforce_eager
    )
    engine = DecodeEngine(loaded, config, spec.fingerprint, kv_cache_dtype=kv_cache_dtype)
    for i, prompt in enumerate(prompts):
        engine.add_request(EngineRequest(str(i), prompt, params))
    return _drain(engine)


def _drain(engine: DecodeEngine) -> Iterator[tuple[int, TokenOutput]]:
    while engine.has_unfinished():
        for output in engine.step():
            yield int(output.request_id), output
