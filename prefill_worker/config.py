"""How a prefill worker runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from kvstore.hashing import DEFAULT_BLOCK_SIZE
from model.runtime import ModelRuntime
from rpc.limits import WorkerLimits
from rpc.worker_server import WorkerAddress


@dataclass(frozen=True)
class PrefillConfig:
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
    block_size: int = DEFAULT_BLOCK_SIZE
    """Tokens per KV block; every worker of a cluster must agree."""
    token_budget: int = 2048
    """Most prompt tokens in one forward pass; longer prompts are chunked."""
    enable_prefix_cache: bool = True
    """Load a prompt's cached prefix blocks from the store instead of computing them
    (off: every prompt is computed in full, for benchmarks that compare)."""

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.token_budget < 1:
            raise ValueError("block_size and token_budget must be >= 1")
