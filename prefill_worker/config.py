"""How a prefill worker runs."""

from __future__ import annotations

from dataclasses import dataclass

from rpc.worker_server import WorkerAddress


@dataclass(frozen=True)
class PrefillConfig:
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
    """Unique id; empty means `prefill-<host>-<port>`."""
    dtype: str | None = None
    """float32, bfloat16 or float16; default float32 on CPU, bfloat16 on CUDA."""
    device: str = "cpu"
    block_size: int = 16
    """Tokens per KV block; every worker of a cluster must agree."""
    token_budget: int = 2048
    """Most prompt tokens in one forward pass; longer prompts are chunked."""
    enable_prefix_cache: bool = True
    """Load a prompt's cached prefix blocks from the store instead of computing them
    (off: every prompt is computed in full, for benchmarks that compare)."""
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
        if self.block_size < 1 or self.token_budget < 1:
            raise ValueError("block_size and token_budget must be >= 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError("num_threads must be >= 1")
