"""The worker flags `kvrelay serve` and `kvrelay up` share, and the one place they
become the workers' configs.

`add_worker_flags` declares them, `worker_options` reads them into a
`WorkerOptions`, and `prefill_config` / `decode_config` turn options plus a
worker's address into the `PrefillConfig` / `DecodeConfig` its service runs with.
`kvrelay serve` calls them for its one process; the Ray launcher for each actor.
Config modules are imported inside the functions: `decode_worker.config` pulls in
torch, which `kvrelay --help` must not.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from kvstore.hashing import DEFAULT_BLOCK_SIZE
from kvstore.kv_format import AUTO, KV_CACHE_DTYPES
from rpc.limits import WorkerLimits

MIN_KV_SECRET_BYTES = 16  # kvstore.codec.MIN_SECRET_BYTES (which imports torch)

if TYPE_CHECKING:
    from decode_worker.config import DecodeConfig
    from prefill_worker.config import PrefillConfig
    from rpc.worker_server import WorkerAddress


@dataclass(frozen=True)
class WorkerOptions:
    """What a user sets for the workers of a cluster (every worker alike)."""

    model: str = "dummy:tiny"
    """HF directory, GGUF file or preset."""
    dtype: str | None = None
    """float32, bfloat16 or float16; None: the device's default."""
    device: str = "cpu"
    num_threads: int | None = None
    """torch threads; None: the cores the process may run on."""
    kv_cache_dtype: str = AUTO
    """How K/V is stored in pools, the store and on the wire; every worker must agree."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Tokens per KV block; every worker of a cluster must agree."""
    token_budget: int = 2048
    """Prefill: most prompt tokens in one forward pass."""
    kv_cache_gb: float = 0.5
    """Decode: memory for the KV pool, GiB."""
    max_num_seqs: int = 64
    """Decode: running requests at most."""
    max_num_batched_tokens: int = 512
    """Decode: tokens computed per engine step, decodes and prefill chunks together
    (the chunked-prefill budget; `SchedulerConfig.max_num_batched_tokens`)."""
    max_local_prefill_len: int = 0
    """Decode: prompts up to this many tokens are prefilled there."""
    enable_prefix_cache: bool = True
    """Reuse cached KV (off: compute every prompt in full, for comparisons)."""
    enforce_eager: bool = False
    """Decode on CUDA: launch every step's kernels one by one, no CUDA graphs."""
    publish_generated: bool = True
    """Decode: put the full blocks it computes into the store (resumes and the next
    turn of a conversation fetch them)."""
    drain_timeout_s: float = 30.0
    """On SIGTERM: how long a worker lets its requests finish before stopping."""
    max_queued: int = 128
    """Requests a worker holds that are not running yet; past it, RESOURCE_EXHAUSTED."""
    engine_stall_timeout_s: float = 60.0
    """No engine progress for this long with work queued: NOT_SERVING, no routing."""
    kv_secret: bytes | None = field(default=None, repr=False)
    """The cluster's KV secret (from --kv-secret-file): blocks carry a MAC."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.token_budget < 1 or self.max_num_seqs < 1:
            raise ValueError("--block-size, --token-budget and --max-num-seqs must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"--max-num-batched-tokens must be >= 1, got {self.max_num_batched_tokens}"
            )
        if self.kv_cache_gb <= 0:
            raise ValueError(f"--kv-cache-gb must be > 0, got {self.kv_cache_gb}")
        if self.max_local_prefill_len < 0:
            raise ValueError("--max-local-prefill-len must be >= 0")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("--threads must be >= 1")
        if self.drain_timeout_s < 0:
            raise ValueError(f"--drain-timeout must be >= 0, got {self.drain_timeout_s}")
        self.limits()  # raises for a bad --max-queued or --engine-stall-timeout
        if self.kv_secret is not None and len(self.kv_secret) < MIN_KV_SECRET_BYTES:
            raise ValueError(
                f"the --kv-secret-file holds {len(self.kv_secret)} bytes; use at least "
                f"{MIN_KV_SECRET_BYTES} (e.g. `head -c 32 /dev/urandom | base64 > FILE`)"
            )

    def limits(self) -> WorkerLimits:
        return WorkerLimits(self.max_queued, self.engine_stall_timeout_s)


def add_worker_flags(parser: argparse.ArgumentParser, *, with_placement: bool = True) -> None:
    """Declares the worker flags; `with_placement` adds --device and --threads (which
    `kvrelay up` leaves to Ray)."""
    group = parser.add_argument_group("workers")
    group.add_argument(
        "--model", default="dummy:tiny", help="HF directory, GGUF file or preset (dummy:*)"
    )
    group.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    add_kv_cache_dtype_flag(group)
    if with_placement:
        group.add_argument("--device", default="cpu", help="torch device (default: %(default)s)")
        group.add_argument(
            "--threads", type=int, help="torch threads (default: this process's cores)"
        )
    group.add_argument(
        "--block-size", type=int, default=DEFAULT_BLOCK_SIZE, help="tokens per KV block"
    )
    group.add_argument(
        "--token-budget", type=int, default=2048, help="prefill: most tokens per forward pass"
    )
    group.add_argument(
        "--kv-cache-gb", type=float, default=0.5, help="decode: memory for the KV pool in GiB"
    )
    group.add_argument(
        "--max-num-seqs", type=int, default=64, help="decode: running requests at most"
    )
    group.add_argument(
        "--max-num-batched-tokens",
        type=int,
        default=512,
        help="decode: tokens per engine step, decodes and prefill chunks together; a longer "
        "prompt prefilled here is chunked to fit (default: %(default)s)",
    )
    group.add_argument(
        "--max-local-prefill-len",
        type=int,
        default=0,
        help="decode: prompts up to this many tokens are prefilled here, not by a prefill worker",
    )
    group.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="compute every prompt in full, never reuse cached KV (for comparisons)",
    )
    group.add_argument(
        "--enforce-eager",
        action="store_true",
        help="decode on CUDA: run every step eagerly instead of replaying captured CUDA "
        "graphs (slower for small models; for debugging and comparisons; the CPU is "
        "always eager)",
    )
    group.add_argument(
        "--no-publish-generated",
        action="store_true",
        help="decode: keep the blocks it computes to itself (by default they go to the "
        "store, so a request resumed elsewhere, or a conversation's next turn, reuses them)",
    )
    group.add_argument(
        "--drain-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="on SIGTERM, let requests in flight finish for this long; those still running "
        "then resume on another worker (default: %(default)s)",
    )
    group.add_argument(
        "--kv-secret-file",
        metavar="FILE",
        help="the cluster's KV secret (every worker the same file, at least 16 bytes): "
        "blocks in the store then carry a MAC, and one written without it is never used",
    )
    group.add_argument(
        "--max-queued",
        type=int,
        default=128,
        help="requests a worker holds that are not running yet (fetching, waiting); past "
        "it a new one gets RESOURCE_EXHAUSTED and the router tries another worker "
        "(default: %(default)s)",
    )
    group.add_argument(
        "--engine-stall-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="a worker whose engine makes no progress for this long with work queued "
        "reports NOT_SERVING and gets no requests until it moves again (default: %(default)s)",
    )


def add_kv_cache_dtype_flag(group: argparse._ActionsContainer) -> None:
    """`--kv-cache-dtype`, shared with `kvrelay generate --local`."""
    group.add_argument(
        "--kv-cache-dtype",
        choices=KV_CACHE_DTYPES,
        default=AUTO,
        help="how K/V is stored in the decode pool, the KV store and on the wire: auto (the "
        "model's dtype), or 8 bits with a float16 scale per token and head, int8 (the "
        "accurate one) or fp8_e4m3: about a quarter of float32's bytes, twice the pool "
        "tokens of bfloat16; every worker of a cluster must use the same (default: %(default)s)",
    )


def worker_options(args: argparse.Namespace) -> WorkerOptions:
    """Raises ValueError (naming the flag) for values no worker accepts."""
    return WorkerOptions(
        model=args.model,
        dtype=None if args.dtype == "auto" else args.dtype,
        device=getattr(args, "device", "cpu"),
        num_threads=getattr(args, "threads", None),
        kv_cache_dtype=args.kv_cache_dtype,
        block_size=args.block_size,
        token_budget=args.token_budget,
        kv_cache_gb=args.kv_cache_gb,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_local_prefill_len=args.max_local_prefill_len,
        enable_prefix_cache=not args.no_prefix_cache,
        enforce_eager=args.enforce_eager,
        publish_generated=not args.no_publish_generated,
        drain_timeout_s=args.drain_timeout,
        max_queued=args.max_queued,
        engine_stall_timeout_s=args.engine_stall_timeout,
        kv_secret=_read_secret(args.kv_secret_file) if args.kv_secret_file else None,
    )


def _read_secret(path: str) -> bytes:
    """The secret file's bytes, without a trailing newline. Raises ValueError."""
    try:
        return Path(path).read_bytes().rstrip(b"\r\n")
    except OSError as err:
        raise ValueError(f"cannot read --kv-secret-file {path}: {err.strerror}") from None


def prefill_config(options: WorkerOptions, where: WorkerAddress, store_url: str) -> PrefillConfig:
    from prefill_worker.config import PrefillConfig

    return PrefillConfig(
        where=where,
        runtime=_runtime(options),
        limits=options.limits(),
        store_url=store_url,
        store_secret=options.kv_secret,
        block_size=options.block_size,
        token_budget=options.token_budget,
        enable_prefix_cache=options.enable_prefix_cache,
    )


def decode_config(options: WorkerOptions, where: WorkerAddress, store_url: str) -> DecodeConfig:
    from decode_worker.config import DecodeConfig, EngineConfig
    from decode_worker.scheduler import SchedulerConfig

    return DecodeConfig(
        where=where,
        runtime=_runtime(options),
        limits=options.limits(),
        store_url=store_url,
        store_secret=options.kv_secret,
        engine=EngineConfig(
            kv_cache_bytes=int(options.kv_cache_gb * 1024**3),
            block_size=options.block_size,
            scheduler=SchedulerConfig(
                max_num_seqs=options.max_num_seqs,
                max_num_batched_tokens=options.max_num_batched_tokens,
                enable_prefix_caching=options.enable_prefix_cache,
            ),
            enforce_eager=options.enforce_eager,
        ),
        max_local_prefill_len=options.max_local_prefill_len,
        publish_computed_blocks=options.publish_generated,
    )


def _runtime(options: WorkerOptions):
    from model.runtime import ModelRuntime

    return ModelRuntime(
        options.model,
        options.dtype,
        options.device,
        kv_cache_dtype=options.kv_cache_dtype,
        num_threads=options.num_threads,
    )
