"""`EngineConfig`: a decode engine's pool and batch sizes. Apart from the worker's
config (`decode_worker.config`), so that the engine imports no rpc: it runs on a
bare GPU host with torch alone (`benchmarks.gpu_check`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from decode_worker.scheduler import SchedulerConfig
from kvstore.hashing import DEFAULT_BLOCK_SIZE


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
    enforce_eager: bool = False
    """Never capture CUDA graphs: every decode step launches its kernels one by one
    (on CUDA; the CPU always runs eagerly)."""

    def __post_init__(self) -> None:
        if self.kv_cache_bytes <= 0 or (self.num_blocks is not None and self.num_blocks <= 0):
            raise ValueError("kv_cache_bytes and num_blocks must be positive")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {self.block_size}")
