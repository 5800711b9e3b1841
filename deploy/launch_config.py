"""`LaunchConfig`: what `kvrelay up` starts on a Ray cluster, and where."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from urllib.parse import parse_qsl, urlsplit

from deploy.worker_flags import WorkerOptions
from rpc.tls import ClusterTLS


@dataclass(frozen=True)
class LaunchConfig:
    """One kvrelay cluster on Ray: a router and its prefill and decode workers."""

    workers: WorkerOptions = field(default_factory=WorkerOptions)
    """Model, dtype and sizes of every worker. The model is a path present on every
    node, or a preset; `device` and `num_threads` are set per actor by the launcher."""
    num_prefill_workers: int = 1
    """Prefill worker actors."""
    num_decode_workers: int = 1
    """Decode worker actors."""
    store_url: str = "ray"
    """KV store URL; `ray` (the Ray object store) needs nothing else running."""
    port: int = 50051
    """Port the router serves on, on the head node (all interfaces)."""
    http_port: int | None = 8000
    """Port of the router's OpenAI-compatible HTTP API, beside `port`; None: off."""
    served_model_name: str | None = None
    """The model's name in the HTTP API; None: the model spec."""
    num_cpus_per_actor: float = 1.0
    """Ray CPUs each actor reserves; workers size their torch thread pools to it."""
    num_gpus_per_worker: float | None = None
    """GPUs each worker reserves; None: 1 where the cluster has GPUs, else 0. A
    worker with a GPU runs the model on `cuda`."""
    router_resources: Mapping[str, float] = field(default_factory=dict)
    """Extra Ray resources the router asks for (custom node resources pin it)."""
    prefill_resources: Mapping[str, float] = field(default_factory=dict)
    """Extra Ray resources each prefill worker asks for."""
    decode_resources: Mapping[str, float] = field(default_factory=dict)
    """Extra Ray resources each decode worker asks for."""
    ready_timeout_s: float = 300.0
    """How long start-up may take before `kvrelay up` gives up."""
    tls: ClusterTLS | None = field(default=None, repr=False)
    """Cluster mTLS for every internal call; `kvrelay up` makes an ephemeral CA."""

    def __post_init__(self) -> None:
        if self.num_prefill_workers < 0 or self.num_decode_workers < 1:
            raise ValueError(
                "a cluster needs at least one decode worker (--decode-workers) and "
                "zero or more prefill workers (--prefill-workers)"
            )
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port} is not a port number")
        if self.http_port is not None and not 0 < self.http_port < 65536:
            raise ValueError(f"--http-port {self.http_port} is not a port number (0 turns it off)")
        if self.num_cpus_per_actor <= 0:
            raise ValueError("num_cpus_per_actor must be > 0")
        if self.num_gpus_per_worker is not None and self.num_gpus_per_worker < 0:
            raise ValueError("num_gpus_per_worker must be >= 0")
        if self.ready_timeout_s <= 0:
            raise ValueError("ready_timeout_s must be > 0")
        scheme = urlsplit(self.store_url).scheme or self.store_url
        if scheme not in ("ray", "redis", "rediss"):
            # `memory` is per process: workers would never see each other's blocks.
            raise ValueError(
                f"--kv-store {self.store_url!r}: use ray (the Ray object store) or "
                "redis://host:port, which every worker can reach"
            )
        for name in ("router_resources", "prefill_resources", "decode_resources"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))

    @property
    def model(self) -> str:
        return self.workers.model

    @property
    def num_workers(self) -> int:
        return self.num_prefill_workers + self.num_decode_workers

    @property
    def is_ray_store(self) -> bool:
        return (urlsplit(self.store_url).scheme or self.store_url) == "ray"

    def store_url_in_namespace(self, namespace: str) -> str:
        """The store URL with its Ray namespace set to `namespace` unless it names
        one: each launch gets its own KV index actor, which it removes on shutdown."""
        if not self.is_ray_store:
            return self.store_url
        query = dict(parse_qsl(urlsplit(self.store_url).query))
        query.setdefault("namespace", namespace)
        return "ray://?" + "&".join(f"{k}={v}" for k, v in query.items())
