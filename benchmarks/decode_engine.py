"""Decode engine against Hugging Face `transformers` `generate`, on the same weights.

    .venv/bin/python -m benchmarks.decode_engine [--trials 5] [--only 16] [--json out.json]

`dummy:135m` (SmolLM-135M's shape), float32, CPU, greedy, 128 new tokens per prompt
(EOS ignored). Two configurations, each with a goal:

- batch 1: one 128-token prompt; goal: ours >= 1.2x `transformers`;
- batch 16: sixteen prompts of 32, 62, ..., 482 tokens; `transformers` gets them
  left-padded with an attention mask, our engine gets them as they are; goal:
  ours >= 2.5x.

The `transformers` model is a `LlamaForCausalLM` built from the preset's config with the
preset's tensors copied in (nothing downloaded); the script checks that its logits match
ours before timing. Tokens/s counts generated tokens over the whole call, prompt
processing included, for both. Batch 1 is also put against the weight-streaming bound:
every decode step reads all weights once, so tokens/s can be at most memory bandwidth ÷
weight bytes, with the bandwidth measured in this run by a large tensor copy.

Each trial runs both systems back to back, in an order that alternates from trial to
trial, so the machine's noise hits both alike; a trial's ratio is ours over theirs.
Reported per configuration: the median ratio, every trial's ratio and their range,
the load average around each trial, and the goal, met only when every trial meets it.
torch's thread pool is sized to the cores this process may run on (`--threads` to
override), as the workers size theirs.
"""

from __future__ import annotations

import argparse
import json
import os
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
    goal: float
    """Ours over theirs, tokens/s, that every trial must reach."""

    @property
    def num_generated_tokens(self) -> int:
        return len(self.prompts) * self.num_new_tokens


def make_workloads(vocab_size: int, num_new_tokens: int) -> list[Workload]:
    generator = torch.Generator().manual_seed(0)

    def prompt(length: int) -> list[int]:
        return torch.randint(3, vocab_size, (length,), generator=generator).tolist()

    return [
        Workload("batch 1 (prompt 128)", [prompt(128)], num_new_tokens, goal=1.2),
        Workload(
            "batch 16 (prompts 32..482)",
            [prompt(n) for n in range(32, 483, 30)],
            num_new_tokens,
            goal=2.5,
        ),
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


class StepBreakdown:
    """Where a steady decode step's time goes, by wrapping the engine's parts with
    timers (CPU: every op is synchronous). `attention` is `attend` over every layer
    (the K/V write and paged attention); `model` is the rest of the forward pass;
    `inputs` is the runner building the step's tensors (ids, positions, slots, block
    tables); `engine` is the rest of `step` (scheduling, sampling, outputs)."""

    PARTS = ("step", "run", "forward", "attention", "logits")

    def __init__(self, loaded: LoadedModel, engine: DecodeEngine) -> None:
        self.seconds = dict.fromkeys(self.PARTS, 0.0)
        self.engine = engine
        self._timed = [
            (engine, "step", "step"),
            (engine.runner, "run", "run"),
            (loaded.model, "forward", "forward"),
            (loaded.model, "compute_logits", "logits"),
        ]

    def _wrap(self, fn: Callable, part: str) -> Callable:
        def timed_call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[part] += time.perf_counter() - start

        return timed_call

    def measure(self, num_steps: int) -> dict[str, float]:
        """ms per step of `num_steps` steps, by part."""
        from decode_worker import model_runner

        backend = model_runner.PagedAttentionBackend
        attend = backend.attend
        for obj, name, part in self._timed:
            setattr(obj, name, self._wrap(getattr(obj, name), part))
        backend.attend = self._wrap(attend, "attention")  # type: ignore[method-assign]
        try:
            for _ in range(num_steps):
                self.engine.step()
        finally:
            backend.attend = attend  # type: ignore[method-assign]
            for obj, name, _ in self._timed:
                delattr(obj, name)  # back to the class's method
        ms = {part: 1000 * s / num_steps for part, s in self.seconds.items()}
        return {
            "step": ms["step"],
            "engine (schedule, sample, outputs)": ms["step"] - ms["run"],
            "inputs (ids, positions, block tables)": ms["run"] - ms["forward"] - ms["logits"],
            "attention (K/V write, paged attention)": ms["attention"],
            "model (matmuls, norms, rotary, MLP)": ms["forward"] - ms["attention"],
            "logits": ms["logits"],
        }


def step_breakdown(loaded: LoadedModel, workload: Workload, num_steps: int = 20) -> dict:
    """`StepBreakdown` of decode steps once every prompt is prefilled."""
    engine = DecodeEngine(loaded, EngineConfig(), FINGERPRINT)
    params = SamplingParams(max_tokens=workload.num_new_tokens, ignore_eos=True)
    for i, prompt in enumerate(workload.prompts):
        engine.add_request(EngineRequest(str(i), prompt, params))
    started: set[str] = set()
    while len(started) < len(workload.prompts):
        started.update(out.request_id for out in engine.step())
    return StepBreakdown(loaded, engine).measure(min(num_steps, workload.num_new_tokens - 2))


@dataclass(frozen=True)
class Trial:
    ours_s: float
    theirs_s: float
    load_before: float
    load_after: float
    same_tokens: int

    @property
    def ratio(self) -> float:
        return self.theirs_s / self.ours_s


def run_trial(
    loaded: LoadedModel, reference: LlamaForCausalLM, workload: Workload, ours_first: bool
) -> Trial:
    load_before = os.getloadavg()[0]
    ours_run = engine_run(loaded, workload)  # the pool allocated before the clock
    runs = {
        "ours": lambda: timed(ours_run),
        "theirs": lambda: timed(lambda: run_transformers(reference, workload)),
    }
    order = ("ours", "theirs") if ours_first else ("theirs", "ours")
    results = {name: runs[name]() for name in order}
    (ours_s, ours), (theirs_s, theirs) = results["ours"], results["theirs"]
    # Sanity, not a gate: padded batches may flip a near-tie in transformers.
    same = sum(a == b for a, b in zip(ours, theirs, strict=True))
    return Trial(ours_s, theirs_s, load_before, os.getloadavg()[0], same)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=5, help="interleaved trials per batch")
    parser.add_argument("--new-tokens", type=int, default=128, help="generated per prompt")
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch threads")
    parser.add_argument(
        "--only", choices=("1", "16"), help="run one configuration (batch 1 or batch 16)"
    )
    parser.add_argument("--json", metavar="FILE", help="also write every trial here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    log(f"loading {MODEL} (ours and transformers), {args.threads} threads")
    loaded = load_model(MODEL, dtype=torch.float32)
    reference = hf_model(loaded.config)
    log(f"logits agree: max |diff| {check_logits_agree(loaded, reference):.2e}")
    bandwidth = memory_bandwidth()
    bound = bandwidth / weight_bytes(loaded)
    log(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s, weights {weight_bytes(loaded) / 1e6:.0f} MB")

    results, breakdowns = {}, {}
    for workload in make_workloads(loaded.config.vocab_size, args.new_tokens):
        if args.only and not workload.name.startswith(f"batch {args.only} "):
            continue
        log(f"{workload.name}: warm-up")
        small = Workload(workload.name, [p[:32] for p in workload.prompts], 4, workload.goal)
        engine_run(loaded, small)()
        run_transformers(reference, small)
        trials = []
        for i in range(args.trials):
            trial = run_trial(loaded, reference, workload, ours_first=i % 2 == 0)
            trials.append(trial)
            log(
                f"{workload.name}: trial {i + 1}/{args.trials}: ours {trial.ours_s:.2f} s, "
                f"transformers {trial.theirs_s:.2f} s, ratio {trial.ratio:.2f}, "
                f"load {trial.load_before:.2f}->{trial.load_after:.2f}"
            )
        results[workload.name] = (workload, trials)
        breakdowns[workload.name] = step_breakdown(loaded, workload)

    print(f"{args.trials} interleaved trials, {args.threads} threads, {args.new_tokens} new tokens")
    print(
        f"{'configuration':<28} {'ours tok/s':>10} {'hf tok/s':>9} {'ratio':>6} "
        f"{'range':>11} {'load':>9} {'same':>6}  goal"
    )
    for name, (workload, trials) in results.items():
        n = workload.num_generated_tokens
        ours_rate = n / statistics.median(t.ours_s for t in trials)
        hf_rate = n / statistics.median(t.theirs_s for t in trials)
        ratios = [t.ratio for t in trials]
        loads = [x for t in trials for x in (t.load_before, t.load_after)]
        met = all(r >= workload.goal for r in ratios)
        print(
            f"{name:<28} {ours_rate:>10.1f} {hf_rate:>9.1f} {statistics.median(ratios):>6.2f} "
            f"{min(ratios):>5.2f}-{max(ratios):<5.2f} {min(loads):>4.1f}-{max(loads):<4.1f} "
            f"{min(t.same_tokens for t in trials):>3}/{len(workload.prompts)}  "
            f">= {workload.goal}: {'met' if met else 'MISSED'} (every trial)",
            flush=True,
        )
        if len(workload.prompts) == 1:
            print(
                f"  ours at {ours_rate / bound:.0%} of the weight-streaming bound ({bound:.1f} tok/s)"
            )
    print("ratio: transformers' seconds / ours, per trial; tok/s: medians over trials")
    for name, parts in breakdowns.items():
        print(f"{name}: a steady decode step, ms: " + ", ".join(
            f"{part} {ms:.1f}" for part, ms in parts.items()
        ))  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    name: {
                        "goal": workload.goal,
                        "num_generated_tokens": workload.num_generated_tokens,
                        "trials": [t.__dict__ | {"ratio": t.ratio} for t in trials],
                        "step_breakdown_ms": breakdowns[name],
                    }
                    for name, (workload, trials) in results.items()
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
