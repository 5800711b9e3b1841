"""A real cluster for tests: router, prefill and decode workers as separate
processes (`kvrelay serve`), talking gRPC over loopback sockets, plus a real OTLP
trace receiver. A plain module, so any test package can import it; the fixtures
that own the processes' lifetimes are in `tests/cluster/conftest.py`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc
from rpc.channel import open_blocking_channel
from rpc.tls import ClusterTLS
from tests.kvstore.redis_server import free_port

ROOT = Path(__file__).resolve().parents[2]


class LocalCluster:
    """Processes of one cluster and blocking stubs to reach them."""

    def __init__(
        self,
        model: str,
        store_url: str,
        logdir: Path,
        *,
        num_prefill: int = 1,
        num_decode: int = 2,
        max_inflight: int = 256,
        max_local_prefill_len: int = 0,
        env: dict[str, str] | None = None,
        router_args: tuple[str, ...] = (),
        worker_args: tuple[str, ...] = (),
        gated: tuple[str, ...] = (),
        tls_dir: Path | None = None,
    ) -> None:
        """`gated` workers reach the router through a closed `GateProxy` (see
        `open_gate`), so they start and load but register only when a test says.
        `tls_dir` (from `kvrelay certs`) runs every service with cluster mTLS."""
        self.model = model
        self.max_inflight = max_inflight
        self.max_local_prefill_len = max_local_prefill_len
        self.store_url = store_url
        self.logdir = logdir
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        """The public port: Generate."""
        self.internal_port = free_port()
        self.internal_target = f"127.0.0.1:{self.internal_port}"
        """The router's internal port: the Registry workers register with."""
        self.tls = ClusterTLS.from_dir(tls_dir) if tls_dir else None
        self._tls_args = ("--tls-dir", str(tls_dir)) if tls_dir else ()
        # A port of its own (the default, 8000, would collide between clusters).
        self.http_port = free_port()
        self.base_url = f"http://127.0.0.1:{self.http_port}/v1"
        """The OpenAI-compatible API, for `openai.OpenAI(base_url=...)`."""
        self.processes: dict[str, subprocess.Popen] = {}
        self.metrics_ports: dict[str, int] = {}
        self._commands: dict[str, tuple[str, ...]] = {}
        self.gate = GateProxy(self.internal_port) if gated else None
        self._start(
            "router",
            "router",
            "--port",
            str(self.port),
            "--internal-port",
            str(self.internal_port),
            "--max-inflight",
            str(max_inflight),
            "--http-port",
            str(self.http_port),
            *router_args,
        )
        for i in range(num_prefill):
            self._start_worker(f"prefill-{i}", "prefill", worker_args, f"prefill-{i}" in gated)
        for i in range(num_decode):
            self._start_worker(
                f"decode-{i}",
                "decode",
                ("--max-local-prefill-len", str(max_local_prefill_len), *worker_args),
                f"decode-{i}" in gated,
            )
        self.channel = grpc.insecure_channel(self.target)
        self.generator = pb_grpc.GeneratorStub(self.channel)
        self.internal_channel = open_blocking_channel(self.internal_target, self.tls)
        self.registry = wgrpc.RegistryStub(self.internal_channel)
        # The router serves once a decode worker is registered (none: it stays NOT_SERVING).
        has_decode = any(f"decode-{i}" not in gated for i in range(num_decode))
        self.wait_ready(num_prefill + num_decode - len(gated), require_serving=has_decode)

    def _start_worker(self, name: str, role: str, args: tuple[str, ...], gated: bool) -> None:
        router = f"127.0.0.1:{self.gate.port}" if gated and self.gate else self.internal_target
        common = ("--router", router, "--kv-store", self.store_url, "--threads", "1")
        self._start(name, role, *common, "--worker-id", name, *args)

    def open_gate(self) -> None:
        """Lets the gated workers reach the router (they register within a second)."""
        assert self.gate is not None, "no worker is gated"
        self.gate.open()

    def restart(self, name: str) -> None:
        """Starts process `name` again with the same command (after it exited)."""
        assert self.processes[name].poll() is not None, f"{name} is still running"
        self._start(name, *self._commands[name])

    def signal(self, name: str, sig: signal.Signals) -> None:
        os.kill(self.processes[name].pid, sig)

    def wait_exit(self, name: str, timeout_s: float) -> int:
        """The exit code of process `name`, which must end within `timeout_s`."""
        return self.processes[name].wait(timeout_s)

    def wait_registered(self, *worker_ids: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not set(worker_ids) <= set(self.workers()):
            for name in worker_ids:
                if self.processes[name].poll() is not None:
                    raise RuntimeError(f"{name} exited early:\n{self.log(name)}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{worker_ids} not registered in {timeout_s} s")
            time.sleep(0.1)

    def start_worker(self, name: str, role: str, *args: str) -> None:
        """One more worker process, registering with this cluster's router; a
        `--tls-dir` among `args` replaces the cluster's."""
        self._start_worker(name, role, args, gated=False)

    def _start(self, name: str, role: str, *args: str) -> None:
        if "--tls-dir" not in args:
            args = (*args, *self._tls_args)
        self._commands[name] = (role, *args)
        self.metrics_ports[name] = free_port()
        args = (*args, "--metrics-port", str(self.metrics_ports[name]))
        log = open(self.logdir / f"{name}.log", "ab")  # noqa: SIM115 (closed with the process)
        self.processes[name] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "deploy.cli",
                "serve",
                role,
                "--model",
                self.model,
                "--host",
                "127.0.0.1",
                "--log-level",
                "WARNING",
                *args,
            ],
            cwd=ROOT,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

    def wait_ready(
        self, num_workers: int, timeout_s: float = 90.0, require_serving: bool = True
    ) -> None:
        deadline = time.monotonic() + timeout_s
        health = health_pb2_grpc.HealthStub(self.channel)
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited early:\n{self.log(name)}")
            try:
                serving = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                workers = self.registry.ListWorkers(wpb.ListWorkersRequest(), timeout=1).workers
                is_serving = serving == health_pb2.HealthCheckResponse.SERVING
                if (is_serving or not require_serving) and len(workers) == num_workers:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"cluster not ready in {timeout_s} s:\n{self.log('router')}")

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")[-4000:]

    def health(self, service: str = "", target: str | None = None) -> int:
        """The health status of `service` at `target` (default: the router's public
        port; another target is internal, so dialled over the cluster's TLS)."""
        tls = self.tls if target not in (None, self.target) else None
        with open_blocking_channel(target or self.target, tls) as channel:
            request = health_pb2.HealthCheckRequest(service=service)
            return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status

    def workers(self) -> dict[str, wpb.WorkerInfo]:
        response = self.registry.ListWorkers(wpb.ListWorkersRequest(), timeout=5)
        return {w.worker_id: w for w in response.workers}

    def stats(self, worker_id: str) -> wpb.WorkerStats:
        info = self.workers()[worker_id]
        with open_blocking_channel(info.address, self.tls) as channel:
            if info.role == wpb.WORKER_ROLE_PREFILL:
                stub = wgrpc.PrefillWorkerStub(channel)
            else:
                stub = wgrpc.DecodeWorkerStub(channel)
            return stub.GetStats(wpb.StatsRequest(), timeout=5)

    def metrics(self, name: str) -> str:
        """The Prometheus exposition text of process `name` (e.g. `decode-0`)."""
        import urllib.request

        url = f"http://127.0.0.1:{self.metrics_ports[name]}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()

    def generate(self, timeout: float = 60, **fields) -> list[pb.GenerateResponse]:
        return list(self.generator.Generate(pb.GenerateRequest(**fields), timeout=timeout))

    def stop(self) -> None:
        self.channel.close()
        self.internal_channel.close()
        if self.gate is not None:
            self.gate.close()
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 10
        for process in self.processes.values():
            try:
                process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()


class GateProxy:
    """A TCP proxy to `127.0.0.1:upstream_port` that refuses connections (accepts and
    closes them) until `open()`, then forwards them. Tests put a worker's router
    address behind one so it can start and load its model yet join the cluster only
    at a moment the test chooses."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._is_open = threading.Event()
        self._sockets: list[socket.socket] = [self._listener]
        threading.Thread(target=self._accept_loop, daemon=True).start()

    def open(self) -> None:
        self._is_open.set()

    def close(self) -> None:
        for sock in list(self._sockets):
            with contextlib.suppress(OSError):
                sock.close()

    def _accept_loop(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            if not self._is_open.is_set():
                client.close()
                continue
            try:
                upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            except OSError:
                client.close()
                continue
            self._sockets += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(source, sink), daemon=True).start()


def _pump(source: socket.socket, sink: socket.socket) -> None:
    try:
        while data := source.recv(1 << 16):
            sink.sendall(data)
    except OSError:
        pass
    for sock in (source, sink):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


class SpanCollector:
    """A real OTLP/gRPC trace receiver: the cluster exports its spans here."""

    def __init__(self) -> None:
        from concurrent import futures

        from opentelemetry.proto.collector.trace.v1 import (
            trace_service_pb2,
            trace_service_pb2_grpc,
        )

        collector = self
        self.spans: list[dict] = []

        class Servicer(trace_service_pb2_grpc.TraceServiceServicer):
            def Export(self, request, context):
                for resource_spans in request.resource_spans:
                    attrs = {
                        a.key: a.value.string_value for a in resource_spans.resource.attributes
                    }
                    for scope_spans in resource_spans.scope_spans:
                        for span in scope_spans.spans:
                            collector.spans.append(
                                {
                                    "service": attrs.get("service.name"),
                                    "name": span.name,
                                    "trace_id": span.trace_id.hex(),
                                    "span_id": span.span_id.hex(),
                                    "parent_id": span.parent_span_id.hex(),
                                    "attributes": {
                                        a.key: _any_value(a.value) for a in span.attributes
                                    },
                                }
                            )
                return trace_service_pb2.ExportTraceServiceResponse()

        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Servicer(), self.server)
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.stop(0)


def _any_value(value):
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


def byte_level_tokenizer(model_dir: Path) -> None:
    """Writes a `tokenizer.json` with one token per byte (ids 3..258) beside a
    checkpoint, so text prompts and stop strings work on a random HF model."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2} | {ch: i + 3 for i, ch in enumerate(alphabet)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>"])
    tokenizer.save(str(model_dir / "tokenizer.json"))
