"""How a decode worker runs: its engine's pool and batch sizes (`EngineConfig`, from
`decode_worker.engine_config`), and the worker around it."""

from __future__ import annotations

from dataclasses import dataclass, field

from decode_worker.engine_config import EngineConfig
from model.runtime import ModelRuntime
from rpc.limits import WorkerLimits
from rpc.worker_server import WorkerAddress


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
