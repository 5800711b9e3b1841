"""Clusters the comparisons start themselves: plain `kvrelay serve` processes, each
worker pinned to its own core with `taskset` and one torch thread, and a
redis-server of their own on a free port, so every configuration starts from an
empty KV store. Everything started is stopped on exit, Ctrl-C included.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import TracebackType

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc
from rpc.channel import open_blocking_channel
from rpc.tls import ClusterTLS

ROOT = Path(__file__).resolve().parents[2]
# Large enough that a colocated decode worker prefills every prompt itself.
LOCAL_PREFILL_ALL = 1 << 30
# The decode worker's own default chunked-prefill budget, --max-num-batched-tokens
# (`SchedulerConfig.max_num_batched_tokens`; not imported: it loads torch).
DEFAULT_DECODE_TOKEN_BUDGET = 512


@dataclass(frozen=True)
class ClusterLayout:
    """Which processes run, and on which cores."""

    name: str
    """The run's name in reports, e.g. "disaggregated"."""
    model: str
    prefill_cores: tuple[int, ...]
    """One prefill worker per entry, pinned to that core."""
    decode_cores: tuple[int, ...]
    """One decode worker per entry, pinned to that core."""
    max_local_prefill_len: int = 0
    """Decode workers prefill prompts up to this long themselves."""
    is_prefix_cache_enabled: bool = True
    """False passes --no-prefix-cache to every worker."""
    kv_cache_gb: float = 2.0
    """Each decode worker's KV pool."""
    decode_token_budget: int = DEFAULT_DECODE_TOKEN_BUDGET
    """Each decode worker's tokens per engine step (--max-num-batched-tokens): the
    chunk size of a prompt it prefills itself, less the running decodes."""
    extra_worker_args: tuple[str, ...] = field(default=())
    """More `kvrelay serve` flags for every worker."""
    extra_router_args: tuple[str, ...] = field(default=())
    """More `kvrelay serve router` flags."""

    def __post_init__(self) -> None:
        if not self.decode_cores:
            raise ValueError("a cluster needs at least one decode worker")
        if self.decode_token_budget < 1:
            raise ValueError(f"decode_token_budget must be >= 1, got {self.decode_token_budget}")
        allowed = os.sched_getaffinity(0)
        missing = sorted(set(self.prefill_cores + self.decode_cores) - allowed)
        if missing:
            raise ValueError(f"cores {missing} are not available here (allowed: {sorted(allowed)})")

    @property
    def num_workers(self) -> int:
        return len(self.prefill_cores) + len(self.decode_cores)

    def describe(self) -> dict[str, object]:
        return asdict(self)

    def summary(self) -> str:
        """One line for reports, e.g. "colocated: decode on cores 0,1 (prefilling
        every prompt), token budget 512"."""
        parts = []
        if self.prefill_cores:
            parts.append(f"prefill on {_cores(self.prefill_cores)}")
        if not self.prefill_cores or self.max_local_prefill_len >= LOCAL_PREFILL_ALL:
            local = "every prompt"
        elif self.max_local_prefill_len:
            local = f"prompts up to {self.max_local_prefill_len} tokens"
        else:
            local = ""
        decode = f"decode on {_cores(self.decode_cores)}"
        parts.append(f"{decode} (prefilling {local})" if local else decode)
        parts.append(f"token budget {self.decode_token_budget}")
        return f"{self.name}: {', '.join(parts)}"


def _cores(cores: tuple[int, ...]) -> str:
    """e.g. "core 1" or "cores 0,1"."""
    return f"core{'s' if len(cores) > 1 else ''} {','.join(map(str, cores))}"


def disaggregated_layout(
    model: str,
    cores: tuple[int, ...],
    *,
    is_prefix_cache_enabled: bool = True,
    name: str = "",
    max_local_prefill_len: int = 0,
) -> ClusterLayout:
    """The first half of `cores` (rounded down, at least one) run prefill workers,
    the rest decode workers; every prompt longer than `max_local_prefill_len` goes
    through a prefill worker (0: every prompt)."""
    if len(cores) < 2:
        raise ValueError("a disaggregated cluster needs at least 2 cores")
    num_prefill = len(cores) // 2
    return ClusterLayout(
        name=name or "disaggregated",
        model=model,
        prefill_cores=cores[:num_prefill],
        decode_cores=cores[num_prefill:],
        max_local_prefill_len=max_local_prefill_len,
        is_prefix_cache_enabled=is_prefix_cache_enabled,
    )


def conditional_layout(
    model: str, cores: tuple[int, ...], max_local_prefill_len: int, name: str = ""
) -> ClusterLayout:
    """Conditional disaggregation: `disaggregated_layout`'s workers, but the decode
    workers prefill prompts up to `max_local_prefill_len` tokens themselves; only
    longer ones go to a prefill worker."""
    if max_local_prefill_len < 1:
        raise ValueError(f"max_local_prefill_len must be >= 1, got {max_local_prefill_len}")
    return disaggregated_layout(
        model, cores, name=name or "conditional", max_local_prefill_len=max_local_prefill_len
    )


def colocated_layout(
    model: str,
    cores: tuple[int, ...],
    name: str = "",
    *,
    decode_token_budget: int = DEFAULT_DECODE_TOKEN_BUDGET,
) -> ClusterLayout:
    """One decode worker per core, each prefilling its own prompts (no prefill
    workers) in chunks of `decode_token_budget` tokens: the same processes-per-core
    as `disaggregated_layout`."""
    return ClusterLayout(
        name=name or "colocated",
        model=model,
        prefill_cores=(),
        decode_cores=cores,
        max_local_prefill_len=LOCAL_PREFILL_ALL,
        decode_token_budget=decode_token_budget,
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class BenchCluster:
    """A running cluster of `layout`; use as a context manager."""

    def __init__(
        self,
        layout: ClusterLayout,
        logdir: Path | None = None,
        *,
        http_port: int | None = None,
        tls_dir: Path | None = None,
    ) -> None:
        """`http_port`: serve the router's OpenAI-compatible API there (0: a free
        port); None (the default) turns it off. `tls_dir` (`kvrelay certs`): every
        internal call over cluster mTLS."""
        self.layout = layout
        self.http_port = free_port() if http_port == 0 else http_port
        self.logdir = logdir or Path(tempfile.mkdtemp(prefix=f"kvrelay-bench-{layout.name}-"))
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        """The public port: Generate."""
        self.internal_target = f"127.0.0.1:{free_port()}"
        """The router's Registry, where workers register."""
        self.tls = ClusterTLS.from_dir(tls_dir) if tls_dir else None
        self._tls_args = ("--tls-dir", str(tls_dir)) if tls_dir else ()
        self.processes: dict[str, subprocess.Popen] = {}
        self._commands: dict[str, list[str]] = {}

    def __enter__(self) -> BenchCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self, timeout_s: float = 180.0) -> None:
        layout = self.layout
        redis_port = free_port()
        self.store_url = f"redis://127.0.0.1:{redis_port}"
        self._spawn(
            "redis",
            [
                *("redis-server", "--port", str(redis_port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.logdir)),
            ],
        )
        http = ("--http-port", str(self.http_port or 0))
        internal = ("--internal-port", self.internal_target.rsplit(":", 1)[1])
        self._serve(
            "router",
            None,
            "router",
            *("--port", str(self.port), *internal, *http, *layout.extra_router_args),
        )
        common = ("--router", self.internal_target, "--kv-store", self.store_url)
        common += ("--threads", "1", *layout.extra_worker_args)
        if not layout.is_prefix_cache_enabled:
            common += ("--no-prefix-cache",)
        for i, core in enumerate(layout.prefill_cores):
            self._serve(f"prefill-{i}", core, "prefill", *common, "--worker-id", f"prefill-{i}")
        for i, core in enumerate(layout.decode_cores):
            self._serve(
                f"decode-{i}",
                core,
                "decode",
                *common,
                "--worker-id",
                f"decode-{i}",
                "--max-local-prefill-len",
                str(layout.max_local_prefill_len),
                "--kv-cache-gb",
                str(layout.kv_cache_gb),
                "--max-num-batched-tokens",
                str(layout.decode_token_budget),
            )
        self._wait_ready(timeout_s)

    def _serve(self, name: str, core: int | None, role: str, *args: str) -> None:
        pin = ["taskset", "-c", str(core)] if core is not None else []
        command = [sys.executable, "-m", "deploy.cli", "serve", role, "--model", self.layout.model]
        command += ["--host", "127.0.0.1", "--log-level", "WARNING", *args, *self._tls_args]
        self._spawn(name, pin + command)

    def restart(self, name: str) -> None:
        """Starts process `name` again with its command (after it exited)."""
        if self.processes[name].poll() is None:
            raise RuntimeError(f"{name} is still running")
        self._spawn(name, self._commands[name])

    def signal(self, name: str, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):  # exited meanwhile
            os.killpg(self.processes[name].pid, sig)

    def registered_workers(self) -> dict[str, str]:
        """Worker id -> the address it registered at."""
        with open_blocking_channel(self.internal_target, self.tls) as channel:
            response = wgrpc.RegistryStub(channel).ListWorkers(wpb.ListWorkersRequest(), timeout=5)
        return {w.worker_id: w.address for w in response.workers}

    def _spawn(self, name: str, command: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._commands[name] = command
        with open(self.logdir / f"{name}.log", "ab") as log:
            # Own session: a Ctrl-C in the terminal reaches only the bench, which
            # then stops these in order (workers deregister before the router goes).
            self.processes[name] = subprocess.Popen(
                command,
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with (
            grpc.insecure_channel(self.target) as channel,
            open_blocking_channel(self.internal_target, self.tls) as internal,
        ):
            health = health_pb2_grpc.HealthStub(channel)
            registry = wgrpc.RegistryStub(internal)
            while time.monotonic() < deadline:
                for name, process in self.processes.items():
                    if process.poll() is not None:
                        raise RuntimeError(f"{name} exited early:\n{self.log(name)}")
                try:
                    status = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                    workers = registry.ListWorkers(wpb.ListWorkersRequest(), timeout=1).workers
                    if (
                        status == health_pb2.HealthCheckResponse.SERVING
                        and len(workers) == self.layout.num_workers
                    ):
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        raise TimeoutError(f"cluster {self.layout.name} not ready in {timeout_s} s")

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")[-4000:]

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every process group (workers first, redis last), SIGKILL to
        whatever is left after `grace_s`."""
        order = sorted(self.processes, key=lambda n: (n == "redis", n == "router"))
        for name in order:
            if self.processes[name].poll() is None:
                with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                    os.killpg(self.processes[name].pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name in order:
            process = self.processes[name]
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        self.processes.clear()
