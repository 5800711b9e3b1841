"""A real cluster for tests: router, prefill and decode workers as separate
processes (`kvrelay serve`), talking gRPC over loopback sockets, plus a real OTLP
trace receiver. A plain module, so any test package can import it; the fixtures
that own the processes' lifetimes are in `tests/cluster/conftest.py`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import generator_pb2 as pb
from protos import generator_pb2_grpc as pb_grpc
from protos import workers_pb2 as wpb
from protos import workers_pb2_grpc as wgrpc
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
    ) -> None:
        self.model = model
        self.max_inflight = max_inflight
        self.max_local_prefill_len = max_local_prefill_len
        self.store_url = store_url
        self.logdir = logdir
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.processes: dict[str, subprocess.Popen] = {}
        self.metrics_ports: dict[str, int] = {}
        self._start(
            "router", "router", "--port", str(self.port), "--max-inflight", str(max_inflight)
        )
        common = ("--router", self.target, "--kv-store", store_url, "--threads", "1")
        for i in range(num_prefill):
            self._start(f"prefill-{i}", "prefill", *common, "--worker-id", f"prefill-{i}")
        for i in range(num_decode):
            self._start(
                f"decode-{i}",
                "decode",
                *common,
                "--worker-id",
                f"decode-{i}",
                "--max-local-prefill-len",
                str(max_local_prefill_len),
            )
        self.channel = grpc.insecure_channel(self.target)
        self.generator = pb_grpc.GeneratorStub(self.channel)
        self.registry = wgrpc.RegistryStub(self.channel)
        self.wait_ready(num_prefill + num_decode)

    def _start(self, name: str, role: str, *args: str) -> None:
        self.metrics_ports[name] = free_port()
        args = (*args, "--metrics-port", str(self.metrics_ports[name]))
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 (closed with the process)
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

    def wait_ready(self, num_workers: int, timeout_s: float = 90.0) -> None:
        deadline = time.monotonic() + timeout_s
        health = health_pb2_grpc.HealthStub(self.channel)
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                if process.poll() is not None:
                    raise RuntimeError(f"{name} exited early:\n{self.log(name)}")
            try:
                serving = health.Check(health_pb2.HealthCheckRequest(), timeout=1).status
                workers = self.registry.ListWorkers(wpb.ListWorkersRequest(), timeout=1).workers
                if (
                    serving == health_pb2.HealthCheckResponse.SERVING
                    and len(workers) == num_workers
                ):
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"cluster not ready in {timeout_s} s:\n{self.log('router')}")

    def log(self, name: str) -> str:
        return (self.logdir / f"{name}.log").read_text(errors="replace")[-4000:]

    def workers(self) -> dict[str, wpb.WorkerInfo]:
        response = self.registry.ListWorkers(wpb.ListWorkersRequest(), timeout=5)
        return {w.worker_id: w for w in response.workers}

    def stats(self, worker_id: str) -> wpb.WorkerStats:
        info = self.workers()[worker_id]
        with grpc.insecure_channel(info.address) as channel:
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
