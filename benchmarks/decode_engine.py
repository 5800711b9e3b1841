"""Decode engine against Hugging Face `transformers` `generate`, on the same weights.

    .venv/bin/python -m benchmarks.decode_engine [--repeats 3] [--stat median]

`dummy:135m` (SmolLM-135M's shape), float32, CPU, greedy, a fixed number of new tokens
per prompt (EOS ignored). Two configurations:

- batch 1: one 128-token prompt;
- batch 16: sixteen prompts with lengths spread evenly over 32..512; `transformers`
  gets them left-padded with an attention mask, our engine gets them as they are.

The `transformers` model is a `LlamaForCausalLM` built from the preset's config with the
preset's tensors copied in (nothing downloaded); the script checks that its logits match
ours before timing. Tokens/s counts generated tokens over the whole call, prompt
processing included, for both. Batch 1 is also put against the weight-streaming bound:
every decode step reads all weights once, so tokens/s can be at most memory bandwidth ÷
weight bytes, with the bandwidth measured in this run by a large tensor copy.

torch's thread pool is sized to the cores this process may run on (`--threads` to
override), as the workers size theirs. Each repeat runs both systems back to back, so
noise from other work on the machine hits both alike.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from decode_worker.engine import DecodeEngine, EngineRequest
from decode_worker.engine_config import EngineConfig
from model.attention import ContiguousKVAttention
from model.config import ModelConfig
from model.loader import LoadedModel, available_cores, load_model
from model.presets import preset_tensors
from model.sampling_params import SamplingParams

MODEL = "dummy:135m"
FINGERPRINT = b"benchmark-decode"


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    num_new_tokens: int

    @property
    def num_generated_tokens(self) -> int:
        return len(self.prompts) * self.num_new_tokens


def make_workloads(vocab_size: int, num_new_tokens: int) -> list[Workload]:
    generator = torch.Generator().manual_seed(0)

    def prompt(length: int) -> list[int]:
        return torch.randint(3, vocab_size, (length,), generator=generator).tolist()

    lengths = torch.linspace(32, 512, 16).round().int().tolist()
    return [
        Workload("batch 1 (prompt 128)", [prompt(128)], num_new_tokens),
        Workload("batch 16 (prompts 32..512)", [prompt(n) for n in lengths], num_new_tokens),
    ]


def hf_model(config: ModelConfig) -> LlamaForCausalLM:
    """`transformers` Llama with the preset's weights (HF names, so a plain state dict)."""
    hf_config = LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers,
        num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_kv_heads,
        head_dim=config.head_dim,
        rms_norm_eps=config.rms_norm_eps,
        rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=list(config.eos_token_ids),
    )
    model = LlamaForCausalLM(hf_config).to(torch.float32).eval()
    missing, unexpected = model.load_state_dict(preset_tensors(MODEL), strict=False)
    # A tied lm_head is not a checkpoint tensor: it shares the embedding's storage.
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    return model


@torch.inference_mode()
def check_logits_agree(loaded: LoadedModel, reference: LlamaForCausalLM) -> float:
    """Max |difference| of the prompt's logits, ours vs theirs; exits if they disagree."""
    prompt = torch.arange(3, 67)
    hidden = loaded.model(prompt, torch.arange(len(prompt)), ContiguousKVAttention([len(prompt)]))
    ours = loaded.model.compute_logits(hidden)
    theirs = reference(prompt[None]).logits[0].float()
    diff = float((ours - theirs).abs().max())
    if diff > 1e-3 or not torch.equal(ours.argmax(-1), theirs.argmax(-1)):
        sys.exit(f"logits disagree with transformers (max |diff| {diff:.2e}): not benchmarking")
    return diff


def engine_run(loaded: LoadedModel, workload: Workload) -> Callable[[], list[list[int]]]:
    """A fresh engine with the workload queued, and the call that generates. The pool is
    allocated here, outside the timed call, as a serving engine allocates it once; a
    fresh engine per run keeps the previous run's blocks from being reused as a prefix."""
    # The engine's defaults: a 512 MiB pool, 512 tokens per step (chunked prefill).
    engine = DecodeEngine(loaded, EngineConfig(), FINGERPRINT)
    params = SamplingParams(max_tokens=workload.num_new_tokens, ignore_eos=True)
    for i, prompt in enumerate(workload.prompts):
        engine.add_request(EngineRequest(str(i), prompt, params))

    def generate() -> list[list[int]]:
        tokens: list[list[int]] = [[] for _ in workload.prompts]
        while engine.has_unfinished():
            for out in engine.step():
                tokens[int(out.request_id)].append(out.token_id)
        return tokens

    return generate


@torch.inference_mode()
def run_transformers(model: LlamaForCausalLM, workload: Workload) -> list[list[int]]:
    width = max(len(p) for p in workload.prompts)
    input_ids = torch.zeros(len(workload.prompts), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(workload.prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=workload.num_new_tokens,
        min_new_tokens=workload.num_new_tokens,
        do_sample=False,
        pad_token_id=0,
    )
    return out[:, width:].tolist()


def memory_bandwidth(num_bytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s of the best of `repeats` copies of a `num_bytes` tensor (read + write)."""
    src = torch.ones(num_bytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - start)
    return 2 * num_bytes / best


def weight_bytes(loaded: LoadedModel) -> int:
    """Bytes every decode step reads: each parameter once (the tied embedding is the lm
    head; its row lookup is negligible)."""
    return sum(p.numel() * p.element_size() for p in loaded.model.parameters())


def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per system")
    parser.add_argument(
        "--stat", choices=("median", "best"), default="median", help="which run to report"
    )
    parser.add_argument("--new-tokens", type=int, default=128, help="generated per prompt")
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch threads")
    parser.add_argument(
        "--only", choices=("1", "16"), help="run one configuration (batch 1 or batch 16)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pick = min if args.stat == "best" else statistics.median

    log(f"loading {MODEL} (ours and transformers), {args.threads} threads")
    loaded = load_model(MODEL, dtype=torch.float32)
    reference = hf_model(loaded.config)
    log(f"logits agree: max |diff| {check_logits_agree(loaded, reference):.2e}")
    bandwidth = memory_bandwidth()
    bound = bandwidth / weight_bytes(loaded)
    log(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s, weights {weight_bytes(loaded) / 1e6:.0f} MB")

    print(f"{'configuration':<28} {'ours tok/s':>11} {'hf tok/s':>9} {'ratio':>6} {'same':>6}")
    for workload in make_workloads(loaded.config.vocab_size, args.new_tokens):
        if args.only and not workload.name.startswith(f"batch {args.only} "):
            continue
        log(f"{workload.name}: warm-up")
        small = Workload(workload.name, [p[:32] for p in workload.prompts], 4)
        engine_run(loaded, small)()
        run_transformers(reference, small)
        ours_times, hf_times = [], []
        for repeat in range(args.repeats):
            seconds, ours = timed(engine_run(loaded, workload))
            ours_times.append(seconds)
            log(f"{workload.name}: run {repeat + 1}/{args.repeats} ours {seconds:.2f} s")
            seconds, theirs = timed(lambda w=workload: run_transformers(reference, w))
            hf_times.append(seconds)
            log(f"{workload.name}: run {repeat + 1}/{args.repeats} transformers {seconds:.2f} s")
        ours_rate = workload.num_generated_tokens / pick(ours_times)
        hf_rate = workload.num_generated_tokens / pick(hf_times)
        # Sanity, not a gate: padded batches may flip a near-tie in transformers.
        num_same = sum(a == b for a, b in zip(ours, theirs, strict=True))
        print(
            f"{workload.name:<28} {ours_rate:>11.1f} {hf_rate:>9.1f} "
            f"{ours_rate / hf_rate:>6.2f} {num_same:>3}/{len(ours)}",
            flush=True,
        )
        if len(workload.prompts) == 1:
            print(
                f"  ours at {ours_rate / bound:.0%} of the weight-streaming bound ({bound:.1f} tok/s)"
            )
    print(f"({args.stat} of {args.repeats} runs; generated tokens / wall time incl. prefill)")


if __name__ == "__main__":
    main()
