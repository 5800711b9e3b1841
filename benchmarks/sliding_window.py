"""`python -m benchmarks.sliding_window`: what a sliding window bounds, and decode
speed on a windowed model, each against its baseline in the same run.

    python -m benchmarks.sliding_window [--prompt-len 4096] [--trials 3] [--steps 8]

On `dummy:gemma3-270m` (Gemma-3-270M's shape: 18 layers, 1 KV head of 256, a
512-token window on 15 layers, 3 global; seeded random weights), float32 on this
CPU, one 4,096-token prompt:

- `pool`: the disaggregated path without sockets, for three variants of the same
  weights (windowed on every layer, the preset's hybrid, no window): a prefill flow
  (512-token chunks) publishes the prompt's K/V to a memory store, a decode
  admission fetches what it needs, and a decode engine generates 32 tokens from it.
  Reported: the K/V bytes published and fetched (blocks and the tail), and the most
  blocks the sequence held in the decode pool.
- `speed`: decode tokens/s at that context, batch 1, our decode engine against
  `transformers`' `Gemma3ForCausalLM` with the same tensors (its sliding-window
  cache), `--trials` interleaved trials of `--steps` tokens each after both have
  prefilled the prompt; the logits of the two are checked to agree first.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import sys
import time

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig

from decode_worker.admission import DecodeAdmission, DecodeCall, PrefillHandoff
from decode_worker.engine import DecodeEngine, EngineRequest
from decode_worker.engine_config import EngineConfig
from decode_worker.engine_loop import EngineLoop
from decode_worker.scheduler import SchedulerConfig
from kvstore.memory_store import MemoryStore
from kvstore.spec import BlockSpec
from model.attention import ContiguousKVAttention
from model.config import ModelConfig
from model.loader import LoadedModel, available_cores
from model.presets import preset_config, preset_tensors
from model.sampling_params import SamplingParams
from model.tokenizer import ByteTokenizer
from model.transformer import build_transformer
from prefill_worker.engine import PrefillEngine
from prefill_worker.prefill_flow import PrefillFlow
from telemetry.metrics import ServiceMetrics

MODEL = "dummy:gemma3-270m"
BLOCK_SIZE = 16


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def variant(config: ModelConfig, name: str, tensors: dict[str, torch.Tensor]) -> LoadedModel:
    model = build_transformer(config, tensors, dtype=torch.float32, device=torch.device("cpu"))
    return LoadedModel(
        name, config, model.eval(), ByteTokenizer(), torch.float32, torch.device("cpu")
    )


def a_prompt(n: int, vocab_size: int) -> list[int]:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(3, vocab_size, (n,), generator=generator).tolist()


def engine_for(loaded: LoadedModel, prompt_len: int, max_tokens: int) -> DecodeEngine:
    num_blocks = -(-(prompt_len + max_tokens) // BLOCK_SIZE) + 8
    config = EngineConfig(
        num_blocks=num_blocks,
        block_size=BLOCK_SIZE,
        scheduler=SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=512),
    )
    return DecodeEngine(loaded, config, b"benchmark-sliding-window")


def pool_part(variants: dict[str, LoadedModel], prompt: list[int]) -> str:
    """Each variant through the disaggregated path without sockets: a prefill flow
    publishing to a memory store, a decode admission fetching from it, and a decode
    engine running what it admitted."""
    rows = []
    params = SamplingParams(max_tokens=33, ignore_eos=True)
    for name, loaded in variants.items():
        start = time.perf_counter()
        spec = BlockSpec.for_model(MODEL, loaded.config, torch.float32, BLOCK_SIZE)
        store = MemoryStore(spec)
        metrics = ServiceMetrics(MODEL, "prefill")
        prefill_engine = PrefillEngine(loaded, token_budget=512)
        prefill = PrefillFlow(prefill_engine, store, loaded.config, metrics)
        engine = engine_for(loaded, len(prompt), params.max_tokens)
        loop = EngineLoop(engine)  # not started: admission only asks it what is resident
        admission = DecodeAdmission(loop, store, loaded.config, metrics)
        prefill_engine.start()
        try:
            out = asyncio.run(prefill.run("r", prompt, params))
        finally:
            prefill_engine.stop()
        call = DecodeCall("r", prompt, params, [out.first_token_id], PrefillHandoff(out.tail_id))
        admitted = asyncio.run(admission.admit(call))
        fetched = sum(kv.nbytes for kv in admitted.request.provided_kv)
        engine.add_request(admitted.request)
        most_used = 0
        while engine.has_unfinished():
            engine.step()
            most_used = max(most_used, engine.pool.num_used_blocks)
        rows.append(
            [
                name,
                f"{store.stats().bytes_in / 2**20:,.1f} MiB",
                f"{fetched / 2**20:,.1f} MiB ({len(admitted.request.provided_kv)} blocks)",
                str(most_used),
            ]
        )
        log(f"pool {name}: {most_used} blocks, {time.perf_counter() - start:.0f} s")
    header = [
        "variant",
        "K/V the prefill worker published",
        "K/V the decode worker fetched",
        "decode pool blocks held (most)",
    ]
    return table(header, rows)


def hf_reference(config: ModelConfig, tensors: dict[str, torch.Tensor]) -> Gemma3ForCausalLM:
    layer_types = [
        "sliding_attention" if config.window(i) else "full_attention"
        for i in range(config.num_layers)
    ]
    hf_config = Gemma3TextConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rms_norm_eps=config.rms_norm_eps,
        sliding_window=max(config.layer_windows),
        layer_types=layer_types,
        query_pre_attn_scalar=int(config.query_pre_attn_scalar or config.head_dim),
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": config.rope_theta},
            "sliding_attention": {"rope_type": "default", "rope_theta": config.local_rope_theta},
        },
        tie_word_embeddings=True,
        attn_implementation="sdpa",
    )
    model = Gemma3ForCausalLM(hf_config).eval()
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


@torch.inference_mode()
def check_logits_agree(loaded: LoadedModel, reference: Gemma3ForCausalLM) -> float:
    prompt = a_prompt(600, loaded.config.vocab_size)  # past the window
    hidden = loaded.model(
        torch.tensor(prompt), torch.arange(len(prompt)), ContiguousKVAttention([len(prompt)])
    )
    ours = loaded.model.compute_logits(hidden[-1:])[0]
    theirs = reference(torch.tensor([prompt])).logits[0, -1].float()
    error = (ours - theirs).abs().max().item()
    if error > 1e-3 * theirs.abs().max().item():
        raise RuntimeError(f"logits differ from transformers' by {error:.3g}")
    return error


class OurDecode:
    def __init__(self, loaded: LoadedModel, prompt: list[int], max_tokens: int) -> None:
        self.engine = engine_for(loaded, len(prompt), max_tokens)
        params = SamplingParams(max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(EngineRequest("r", prompt, params))
        while not self.engine.step():  # prefill chunks until the first token
            pass

    def steps(self, n: int) -> list[int]:
        return [self.engine.step()[0].token_id for _ in range(n)]


class TheirDecode:
    @torch.inference_mode()
    def __init__(self, model: Gemma3ForCausalLM, prompt: list[int]) -> None:
        self.model = model
        out = model(torch.tensor([prompt]), use_cache=True)
        self.cache = out.past_key_values
        self.next_id = int(out.logits[0, -1].argmax())
        self.position = len(prompt)

    @torch.inference_mode()
    def steps(self, n: int) -> list[int]:
        tokens = []
        for _ in range(n):
            out = self.model(
                torch.tensor([[self.next_id]]),
                past_key_values=self.cache,
                use_cache=True,
                cache_position=torch.tensor([self.position]),
            )
            self.cache = out.past_key_values
            self.position += 1
            self.next_id = int(out.logits[0, -1].argmax())
            tokens.append(self.next_id)
        return tokens


def speed_part(
    loaded: LoadedModel, tensors: dict, prompt: list[int], trials: int, steps: int
) -> str:
    reference = hf_reference(loaded.config, tensors)
    error = check_logits_agree(loaded, reference)
    log(f"logits agree with transformers (max abs difference {error:.2e}); prefilling")
    ours = OurDecode(loaded, prompt, max_tokens=trials * steps + 2)
    theirs = TheirDecode(reference, prompt)
    rates: dict[str, list[float]] = {"kvrelay": [], "transformers": []}
    for trial in range(trials):
        order = (("kvrelay", ours), ("transformers", theirs))
        for name, runner in order if trial % 2 == 0 else order[::-1]:
            start = time.perf_counter()
            runner.steps(steps)
            rates[name].append(steps / (time.perf_counter() - start))
        log(
            f"speed trial {trial + 1}/{trials}: "
            + ", ".join(f"{n} {r[-1]:.2f} tok/s" for n, r in rates.items())
        )
    ratios = [a / b for a, b in zip(rates["kvrelay"], rates["transformers"], strict=True)]
    rows = [
        [
            name,
            f"{statistics.median(r):.2f}",
            f"{min(r):.2f}-{max(r):.2f}",
        ]
        for name, r in rates.items()
    ]
    return (
        f"batch 1 at a {len(prompt):,}-token context, {steps} tokens per trial, {trials} "
        f"interleaved trials, torch threads {torch.get_num_threads()}; logits checked "
        f"against transformers first (max abs difference {error:.1e})\n\n"
        + table(["system", "decode tokens/s (median)", "range"], rows)
        + f"\n\nkvrelay / transformers: median {statistics.median(ratios):.3f}x, "
        f"per trial {min(ratios):.3f}-{max(ratios):.3f}x"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("`", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--prompt-len", type=int, default=4096)
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8, help="decode tokens per trial")
    parser.add_argument("--parts", default="pool,speed", help="pool, speed or both")
    args = parser.parse_args()
    parts = {p.strip() for p in args.parts.split(",")}
    if not parts <= {"pool", "speed"} or args.prompt_len < 1 or args.trials < 1:
        parser.error("--parts is pool and/or speed; --prompt-len and --trials must be >= 1")
    torch.set_num_threads(available_cores())
    config = preset_config(MODEL)
    log(f"drawing {MODEL}'s tensors")
    tensors = preset_tensors(MODEL)
    prompt = a_prompt(args.prompt_len, config.vocab_size)
    print(f"# sliding window on {MODEL} (float32, CPU), a {args.prompt_len:,}-token prompt")
    print(f"started with {load_average()}\n")
    preset = variant(config, MODEL, tensors)
    if "pool" in parts:
        windows = {
            "window 512 on every layer": dataclasses.replace(config, layer_windows=(512,) * 18),
            "the preset: 15 windowed, 3 global": config,
            "no window": dataclasses.replace(config, layer_windows=(), local_rope_theta=None),
        }
        variants = {
            name: preset if c is config else variant(c, name, tensors)
            for name, c in windows.items()
        }
        print(f"## pool\n\n{pool_part(variants, prompt)}\n", flush=True)
        del variants
    if "speed" in parts:
        print(f"## speed\n\n{speed_part(preset, tensors, prompt, args.trials, args.steps)}\n")
    print(f"finished with {load_average()}")


if __name__ == "__main__":
    main()
