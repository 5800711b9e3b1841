"""How a decode worker runs."""

from __future__ import annotations

from dataclasses import dataclass, field

from decode_worker.engine import EngineConfig
from rpc.worker_server import WorkerAddress


@dataclass(frozen=True)
class DecodeConfig:
    model: str = "dummy:tiny"
    """Model name (`dummy:*`) or local Hugging Face directory."""
    address: str = "127.0.0.1:0"
    """host:port to serve on; port 0 picks a free one."""
    advertise_address: str | None = None
    """host:port the router should dial; defaults to `address` with the bound port."""
    router: str | None = None
    """Router's host:port to register with; None runs unregistered (tests)."""
    store_url: str = "memory"
    """KV store URL (`redis://...`, `ray`, `memory`)."""
    worker_id: str = ""
    """Unique id; empty means `decode-<host>:<port>`."""
    dtype: str | None = None
    """float32, bfloat16 or float16; default float32 on CPU, bfloat16 on CUDA."""
    device: str = "cpu"
    engine: EngineConfig = field(default_factory=EngineConfig)
    """Pool and batch sizes."""
    max_local_prefill_len: int = 0
    """Prompts up to this many tokens skip the prefill workers and are prefilled here;
    0 sends every prompt through a prefill worker when one is registered."""
    num_threads: int | None = None
    """torch threads; default: the cores this process may run on."""
    metrics_port: int | None = None
    """Port for Prometheus `/metrics`; None turns it off, 0 picks a free one."""

    @property
    def where(self) -> WorkerAddress:
        """Where it serves and whom it registers with."""
        return WorkerAddress(
            self.address, self.advertise_address, self.worker_id, self.router, self.metrics_port
        )

    def __post_init__(self) -> None:
        if self.max_local_prefill_len < 0:
            raise ValueError("max_local_prefill_len must be >= 0")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
