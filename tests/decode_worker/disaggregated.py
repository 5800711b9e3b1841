"""The disaggregated request path without sockets, for flow tests: a prefill flow
and a decode flow over one memory store, as a router would call them."""

from __future__ import annotations

import asyncio

from decode_worker.admission import DecodeAdmission, DecodeCall, PrefillHandoff
from decode_worker.decode_flow import DecodeFlow
from decode_worker.engine import DecodeEngine
from decode_worker.engine_config import EngineConfig
from decode_worker.engine_loop import EngineLoop
from kvstore.memory_store import MemoryStore
from kvstore.spec import BlockSpec
from model.loader import LoadedModel
from model.sampling_params import SamplingParams
from prefill_worker.engine import PrefillEngine
from prefill_worker.prefill_flow import PrefillFlow
from telemetry.metrics import ServiceMetrics

BLOCK_SIZE = 16  # the engine default, which generate_with_engine uses


class Disaggregated:
    """A prefill flow (`token_budget`-token chunks) and a decode flow sharing one
    memory store: the disaggregated path without sockets."""

    def __init__(
        self, model: LoadedModel, kv_cache_dtype: str = "auto", token_budget: int = 5
    ) -> None:
        self.spec = BlockSpec.for_model(
            model.name, model.config, model.dtype, BLOCK_SIZE, kv_cache_dtype
        )
        self.store = MemoryStore(self.spec)
        self.prefill_engine = PrefillEngine(
            model, token_budget=token_budget, kv_cache_dtype=kv_cache_dtype
        )
        config = EngineConfig(num_blocks=64, block_size=BLOCK_SIZE)
        engine = DecodeEngine(model, config, self.spec.fingerprint, kv_cache_dtype=kv_cache_dtype)
        self.loop = EngineLoop(engine)
        metrics = ServiceMetrics(model.name, "decode")
        self.prefill = PrefillFlow(self.prefill_engine, self.store, model.config, metrics)
        admission = DecodeAdmission(self.loop, self.store, model.config, metrics)
        self.decode = DecodeFlow(self.loop, admission, metrics)

    def __enter__(self) -> Disaggregated:
        self.prefill_engine.start()
        self.loop.start()
        return self

    def __exit__(self, *exc) -> None:
        self.loop.stop()
        self.prefill_engine.stop()

    def generate(self, request_id: str, prompt: list[int], params: SamplingParams) -> list[int]:
        async def run() -> list[int]:
            out = await self.prefill.run(request_id, prompt, params)
            call = DecodeCall(
                request_id, prompt, params, [out.first_token_id], PrefillHandoff(out.tail_id)
            )
            batches = [batch async for batch in self.decode.run(call)]
            return [out.first_token_id, *(t for b in batches for t in b.token_ids)]

        return asyncio.run(run())
