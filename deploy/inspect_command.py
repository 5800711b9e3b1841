"""`kvrelay inspect MODEL`: a model's shape and the KV arithmetic it implies.

Reads only the config (no weights, no torch): architecture, layers, heads, KV heads
and head dim; the KV cache bytes per token, 2 × layers × kv_heads × head_dim ×
dtype bytes (with an 8-bit `--kv-cache-dtype`, (head_dim + 2 scale bytes) × 1 B), and
per block; how many tokens a `--kv-cache-gb` pool holds; and for a model with
sliding-window layers, the window and what one full-context sequence's KV comes to.
"""

from __future__ import annotations

import argparse
import json

from deploy.cli_errors import UsageError
from kvstore.hashing import DEFAULT_BLOCK_SIZE
from kvstore.kv_format import AUTO, KV_CACHE_DTYPES, is_quantized, row_width

EPILOG = """\
examples:
  kvrelay inspect smollm2:135m-instruct
  kvrelay inspect /models/Llama-3.1-8B --dtype bfloat16 --kv-cache-gb 40
  kvrelay inspect model.gguf --json
  kvrelay inspect smollm2:135m-instruct --kv-cache-dtype int8

The pool holds whole blocks only; a decode worker keeps a little of it free
(a watermark) for running requests to grow into.
"""

DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show a model's shape and KV cache bytes per token",
        description="Show a model's shape and the KV arithmetic a deployment needs.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("model", help="HF directory, .gguf file or preset (dummy:*, smollm2:*)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=sorted(DTYPE_BYTES),
        help="KV dtype (the run dtype: float32 on CPU, bfloat16 on CUDA; default %(default)s)",
    )
    parser.add_argument(
        "--kv-cache-dtype",
        default=AUTO,
        choices=KV_CACHE_DTYPES,
        help="how workers store K/V: auto (--dtype) or 8 bits plus a float16 scale per "
        "token and head (default %(default)s)",
    )
    parser.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV block"
    )
    parser.add_argument(
        "--kv-cache-gb",
        type=float,
        default=0.5,
        help="a decode pool's memory (default %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    parser.set_defaults(run=run)


def kv_arithmetic(
    model: str, dtype: str, block_size: int, kv_cache_gb: float, kv_cache_dtype: str = AUTO
) -> dict:
    """Everything `inspect` prints, as a dict. Raises UsageError for a bad model."""
    from model.errors import ModelLoadError
    from model.sources import config_for_model

    if block_size < 1 or kv_cache_gb <= 0:
        raise UsageError("--block-size must be >= 1 and --kv-cache-gb > 0")
    try:
        config = config_for_model(model)
    except ModelLoadError as err:
        raise UsageError(str(err)) from None
    rows_per_token = 2 * config.num_layers * config.num_kv_heads
    element_bytes = 1 if is_quantized(kv_cache_dtype) else DTYPE_BYTES[dtype]
    bytes_per_token = rows_per_token * row_width(kv_cache_dtype, config.head_dim) * element_bytes
    full_precision_bytes = rows_per_token * config.head_dim * DTYPE_BYTES[dtype]
    bytes_per_block = bytes_per_token * block_size
    num_blocks = int(kv_cache_gb * 1024**3) // bytes_per_block
    context = config.max_position_embeddings
    window = max(config.layer_windows, default=0) or None
    num_windowed = sum(1 for w in config.layer_windows if w)
    # A windowed layer needs the last `window` positions: ceil(w / block) + 1 blocks.
    windowed_tokens = min(context, (-(-window // block_size) + 1) * block_size) if window else 0
    bytes_per_layer_token = bytes_per_token // config.num_layers
    bounded_bytes = bytes_per_layer_token * (
        (config.num_layers - num_windowed) * context + num_windowed * windowed_tokens
    )
    return {
        "model": model,
        "architecture": config.architecture,
        "num_layers": config.num_layers,
        "num_heads": config.num_heads,
        "num_kv_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "hidden_size": config.hidden_size,
        "vocab_size": config.vocab_size,
        "max_context_len": config.max_position_embeddings,
        "kv_dtype": dtype,
        "kv_cache_dtype": kv_cache_dtype,
        "kv_bytes_per_token": bytes_per_token,
        "kv_bytes_ratio": round(bytes_per_token / full_precision_bytes, 4),
        "block_size": block_size,
        "kv_bytes_per_block": bytes_per_block,
        "kv_cache_gb": kv_cache_gb,
        "pool_blocks": num_blocks,
        "pool_tokens": num_blocks * block_size,
        "sliding_window": window,
        "num_windowed_layers": num_windowed,
        "kv_bytes_per_full_context": bytes_per_token * context,
        "kv_bytes_per_full_context_windowed": bounded_bytes,
        "pool_frees_behind_window": config.full_window is not None,
    }


def run(args: argparse.Namespace) -> int:
    facts = kv_arithmetic(
        args.model, args.dtype, args.block_size, args.kv_cache_gb, args.kv_cache_dtype
    )
    if args.json:
        print(json.dumps(facts))
        return 0
    f = facts
    print(f"{f['model']}: {f['architecture']}")
    print(
        f"  layers {f['num_layers']}, heads {f['num_heads']}, KV heads {f['num_kv_heads']}, "
        f"head dim {f['head_dim']}, hidden {f['hidden_size']}, vocab {f['vocab_size']}, "
        f"context {f['max_context_len']}"
    )
    if is_quantized(f["kv_cache_dtype"]):
        row = f"({f['head_dim']} + 2 scale) x 1 B ({f['kv_cache_dtype']})"
        ratio = f", {f['kv_bytes_ratio']:.3f}x of {f['kv_dtype']}"
    else:
        row, ratio = f"{f['head_dim']} x {DTYPE_BYTES[f['kv_dtype']]} B ({f['kv_dtype']})", ""
    print(
        f"  KV per token: 2 x {f['num_layers']} layers x {f['num_kv_heads']} KV heads x "
        f"{row} = {f['kv_bytes_per_token']:,} B ({f['kv_bytes_per_token'] / 1024:.1f} KiB{ratio})"
    )
    print(
        f"  KV per block of {f['block_size']} tokens: {f['kv_bytes_per_block']:,} B "
        f"({f['kv_bytes_per_block'] / 2**20:.2f} MiB)"
    )
    print(
        f"  a {f['kv_cache_gb']:g} GiB pool holds {f['pool_blocks']:,} blocks = "
        f"{f['pool_tokens']:,} tokens ({f['pool_tokens'] / f['max_context_len']:.1f} full contexts)"
    )
    if f["sliding_window"]:
        full, bounded = f["kv_bytes_per_full_context"], f["kv_bytes_per_full_context_windowed"]
        print(
            f"  sliding window {f['sliding_window']:,} on {f['num_windowed_layers']} of "
            f"{f['num_layers']} layers: a {f['max_context_len']:,}-token sequence's KV is "
            f"{full / 2**20:,.1f} MiB, {bounded / 2**20:,.1f} MiB ({bounded / full:.3f}x) "
            "with the windowed layers keeping their window only"
        )
        if f["pool_frees_behind_window"]:
            print("  every layer is windowed: the decode pool frees blocks behind the window")
        else:
            print(
                "  the global layers need every block, so the decode pool keeps them all "
                "(per-layer-group pools would hold the bounded figure)"
            )
    return 0
