"""How a decode worker runs: its engine's pool and batch sizes, and the worker around it."""

from __future__ import annotations

from dataclasses import dataclass, field

from decode_worker.scheduler import SchedulerConfig
from kvstore.hashing import DEFAULT_BLOCK_SIZE
from model.runtime import ModelRuntime
from rpc.limits import WorkerLimits
from rpc.worker_server import WorkerAddress


@dataclass(frozen=True)
class EngineConfig:
    """Pool and batch sizes of one decode engine."""

    kv_cache_bytes: int = 512 * 1024 * 1024
    """Memory for the KV pool; the number of blocks follows from the model's shape."""
    num_blocks: int | None = None
    """Pool size in blocks; overrides kv_cache_bytes (tests use tiny pools)."""
    block_size: int = DEFAULT_BLOCK_SIZE
    """Tokens per block; must match the KV store's."""
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    """Batch limits, the admission watermark and prefix reuse."""

    def __post_init__(self) -> None:
        if self.kv_cache_bytes <= 0 or (self.num_blocks is not None and self.num_blocks <= 0):
            raise ValueError("kv_cache_bytes and num_blocks must be positive")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")


@dataclass(frozen=True)
class DecodeConfig:
    where: WorkerAddress = field(default_factory=WorkerAddress)
    """Where it serves and whom it registers with."""
    runtime: ModelRuntime = field(default_factory=ModelRuntime)
    """The model, its dtype, device and threads."""
    limits: WorkerLimits = field(default_factory=WorkerLimits)
    """Queue bound and engine watchdog."""
    store_url: str = "memory"
    """KV store URL (`redis://...`, `ray`, `memory`)."""
    store_secret: bytes | None = field(default=None, repr=False)
    """The cluster's KV secret: blocks carry a MAC, and one without is a miss."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Pool and batch sizes."""
    max_local_prefill_len: int = 0
    """Prompts up to this many tokens skip the prefill workers and are prefilled here;
    0 sends every prompt through a prefill worker when one is registered."""
    publish_computed_blocks: bool = True
    """Put every full block this worker computes (generated tokens, prompts it
    prefilled) into the store, so a resumed request or the next turn of a
    conversation finds them on any worker (`--no-publish-generated` turns it off)."""

    def __post_init__(self) -> None:
        if self.max_local_prefill_len < 0:
            raise ValueError("max_local_prefill_len must be >= 0")
