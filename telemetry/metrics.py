"""Prometheus metrics of every service, named as users know them from vLLM.

Each service process owns one `ServiceMetrics`: histograms it observes as requests
flow, plus gauges and counters read at scrape time from the counters the service
already keeps (engine counters, store stats), so nothing is counted twice. Every
series carries `model_name` and `role` labels. `serve_metrics(port)` exposes them
on `/metrics`, always in the classic text format: prometheus_client's OpenMetrics
output (what Prometheus asks for first) escapes the `:` of `kvrelay:` names to `_`,
so a scraper would store names no dashboard or vLLM user expects.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from socketserver import ThreadingMixIn
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "kvrelay:"

# The classic Prometheus text format, which every Prometheus version reads.
TEXT_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets in seconds: sub-millisecond decode steps up to minute-long requests.
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
    0.75, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
)  # fmt: skip


@dataclass(frozen=True)
class Snapshot:
    """What a service reports at scrape time. Gauges are current values; totals
    only ever grow. Fields a role does not have stay None and are not exported."""

    num_requests_waiting: int | None = None
    num_requests_running: int | None = None
    kv_cache_usage_perc: float | None = None
    prompt_tokens_total: int | None = None
    cached_prompt_tokens_total: int | None = None
    generation_tokens_total: int | None = None
    num_preemptions_total: int | None = None
    admission_rejections_total: int | None = None
    request_migrations_total: int | None = None
    prefill_retries_total: int | None = None
    kv_store_hits_total: int | None = None
    kv_store_misses_total: int | None = None
    kv_store_corrupt_blocks_total: int | None = None
    kv_store_errors_total: int | None = None
    kv_transfer_bytes_in_total: int | None = None
    kv_transfer_bytes_out_total: int | None = None


# Snapshot field -> (metric type, help text).
_SNAPSHOT_METRICS: dict[str, tuple[str, str]] = {
    "num_requests_waiting": ("gauge", "Requests waiting to be scheduled."),
    "num_requests_running": ("gauge", "Requests being served."),
    "kv_cache_usage_perc": ("gauge", "Fraction of the KV block pool in use (0..1)."),
    "prompt_tokens_total": ("counter", "Prompt tokens computed by the model."),
    "cached_prompt_tokens_total": ("counter", "Prompt tokens whose KV was reused."),
    "generation_tokens_total": ("counter", "Tokens generated."),
    "num_preemptions_total": ("counter", "Requests preempted (recomputed) for lack of blocks."),
    "admission_rejections_total": ("counter", "Requests refused at the admission limit."),
    "request_migrations_total": (
        "counter",
        "Requests resumed on another decode worker after theirs failed.",
    ),
    "prefill_retries_total": (
        "counter",
        "Prefill attempts that failed with the worker at fault and were tried again.",
    ),
    "kv_store_hits_total": ("counter", "KV blocks found in the store."),
    "kv_store_misses_total": ("counter", "KV blocks not found in the store."),
    "kv_store_corrupt_blocks_total": ("counter", "KV blocks that failed their checks."),
    "kv_store_errors_total": ("counter", "KV store calls that failed."),
    "kv_transfer_bytes_in_total": ("counter", "KV bytes written to the store."),
    "kv_transfer_bytes_out_total": ("counter", "KV bytes read from the store."),
}


class _SnapshotCollector(Collector):
    def __init__(self, labels: dict[str, str], read: Callable[[], Snapshot]) -> None:
        self._labels = labels
        self._read = read

    def collect(self) -> Iterator[Metric]:
        snapshot = self._read()
        names, values = list(self._labels), list(self._labels.values())
        for field_name, (kind, doc) in _SNAPSHOT_METRICS.items():
            value = getattr(snapshot, field_name)
            if value is None:
                continue
            if kind == "counter":
                # The client library appends `_total` to counter samples itself.
                family = CounterMetricFamily(
                    PREFIX + field_name.removesuffix("_total"), doc, labels=names
                )
            else:
                family = GaugeMetricFamily(PREFIX + field_name, doc, labels=names)
            family.add_metric(values, value)
            yield family


@dataclass
class ServiceMetrics:
    """The metrics of one service process."""

    model_name: str
    role: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        labels = ["model_name", "role"]

        def histogram(name: str, doc: str) -> Histogram:
            metric = Histogram(
                PREFIX + name, doc, labels, buckets=LATENCY_BUCKETS, registry=self.registry
            )
            return metric.labels(self.model_name, self.role)

        self.time_to_first_token = histogram(
            "time_to_first_token_seconds", "Time from request arrival to its first token."
        )
        self.inter_token_latency = histogram(
            "inter_token_latency_seconds", "Time between consecutive tokens of a request."
        )
        self.e2e_request_latency = histogram(
            "e2e_request_latency_seconds", "Time from request arrival to its last token."
        )
        self.queue_time = histogram(
            "request_queue_time_seconds", "Time a request waited before its work started."
        )
        self.kv_transfer_time = histogram(
            "kv_transfer_seconds", "Time to move one request's KV blocks to or from the store."
        )

    def report(self, read: Callable[[], Snapshot]) -> None:
        """Registers `read`, called at every scrape for the gauges and totals."""
        labels = {"model_name": self.model_name, "role": self.role}
        self.registry.register(_SnapshotCollector(labels, read))


class _MetricsServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        """Scrapes every few seconds would flood the service's log."""


def _classic_text_app(registry: CollectorRegistry) -> Callable:
    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("PATH_INFO", "/") not in ("/", "/metrics"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"not found; metrics are at /metrics\n"]
        body = generate_latest(registry)
        start_response("200 OK", [("Content-Type", TEXT_CONTENT_TYPE)])
        return [body]

    return app


def serve_metrics(metrics: ServiceMetrics, port: int, host: str = "127.0.0.1") -> int:
    """Serves `/metrics` on `port` (0 picks a free one) in a daemon thread; returns the port."""
    server = make_server(
        host,
        port,
        _classic_text_app(metrics.registry),
        server_class=_MetricsServer,
        handler_class=_QuietHandler,
    )
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server.server_address[1]
